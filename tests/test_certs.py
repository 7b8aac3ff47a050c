"""Mutual TLS for the gRPC transport: the certificate set, and real loopback handshakes that must
succeed for a client of our CA and fail for anyone else."""

from __future__ import annotations

import stat
from concurrent import futures
from contextlib import contextmanager
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from splitlora.transport.certs import (
    CertError,
    client_credentials,
    create_certs,
    is_loopback,
    peer_client_id,
    server_credentials,
)

TIMEOUT = 5  # seconds, for every RPC: a broken handshake must fail, never hang
NO_PROXY = [("grpc.enable_http_proxy", 0)]  # an http_proxy in the environment must not capture 127.0.0.1


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return create_certs(tmp_path_factory.mktemp("certs"), num_clients=3)


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A second, unrelated CA with the same names: only the signatures tell the two apart."""
    return create_certs(tmp_path_factory.mktemp("other"), num_clients=1)


def _load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@contextmanager
def _server(certs_dir):
    """A TLS server on 127.0.0.1 with one raw-bytes method that answers with the peer's client id."""
    seen = []

    def whoami(request: bytes, context) -> bytes:
        seen.append(peer_client_id(context))
        return request + b":" + str(seen[-1]).encode()

    handler = grpc.method_handlers_generic_handler(
        "splitlora.Test", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", server_credentials(certs_dir))
    assert port > 0
    server.start()
    try:
        yield port, seen
    finally:
        server.stop(grace=None)


def _call(port: int, creds: grpc.ChannelCredentials, host: str = "127.0.0.1") -> bytes:
    with grpc.secure_channel(f"{host}:{port}", creds, options=NO_PROXY) as channel:
        return channel.unary_unary("/splitlora.Test/WhoAmI")(b"hi", timeout=TIMEOUT)


def test_files_and_permissions(certs):
    d = certs["dir"]
    names = {"ca.pem", "ca.key", "server.pem", "server.key"} | {
        f"client-{i}.{ext}" for i in range(3) for ext in ("pem", "key")}
    assert {p.name for p in d.iterdir()} == names
    assert [(c.name, k.name) for c, k in certs["clients"]] == [
        (f"client-{i}.pem", f"client-{i}.key") for i in range(3)]
    for p in d.glob("*.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p

    server = _load(certs["server"])
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    client = _load(certs["clients"][2][0])
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "client-2"
    assert isinstance(client.public_key(), ec.EllipticCurvePublicKey)
    assert client.public_key().curve.name == "secp256r1"


def test_chains_verify_against_own_ca_only(certs, other_certs):
    ca, other_ca = _load(certs["ca"]), _load(other_certs["ca"])
    client, server = _load(certs["clients"][1][0]), _load(certs["server"])
    client.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    with pytest.raises(InvalidSignature):  # same issuer name, wrong signature
        client.verify_directly_issued_by(other_ca)


@pytest.mark.skipif(not hasattr(PolicyBuilder, "build_client_verifier"), reason="cryptography < 43")
def test_chains_pass_full_path_validation(certs, other_certs):
    """RFC 5280 path validation, EKUs and extension profile included (cryptography's verifier)."""
    ca, other_ca = _load(certs["ca"]), _load(other_certs["ca"])
    client, server = _load(certs["clients"][1][0]), _load(certs["server"])
    mine, theirs = PolicyBuilder().store(Store([ca])), PolicyBuilder().store(Store([other_ca]))
    verified = mine.build_client_verifier().verify(client, [])
    assert verified.subjects[0].value == "client-1"
    mine.build_server_verifier(x509.DNSName("localhost")).verify(server, [])
    with pytest.raises(x509.verification.VerificationError):
        theirs.build_client_verifier().verify(client, [])
    with pytest.raises(x509.verification.VerificationError):  # a client cert is no server cert
        mine.build_server_verifier(x509.DNSName("client-1")).verify(client, [])


def test_valid_client_is_served_and_identified(certs):
    with _server(certs["dir"]) as (port, seen):
        for i in (0, 2):
            assert _call(port, client_credentials(certs["dir"], i)) == f"hi:{i}".encode()
        assert seen == [0, 2]


@pytest.mark.parametrize("who", ["other_ca", "no_cert"])
def test_client_without_our_certificate_is_refused(certs, other_certs, who):
    ca = certs["ca"].read_bytes()
    if who == "other_ca":  # trusts our server, but presents a certificate from another CA
        other_dir = other_certs["dir"]
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=(other_dir / "client-0.key").read_bytes(),
            certificate_chain=(other_dir / "client-0.pem").read_bytes())
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with _server(certs["dir"]) as (port, seen):
        with pytest.raises(grpc.RpcError) as err:
            _call(port, creds)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert seen == []


def test_client_refuses_server_of_another_ca(certs, other_certs):
    with _server(other_certs["dir"]) as (port, seen):
        with pytest.raises(grpc.RpcError) as err:
            _call(port, client_credentials(certs["dir"], 0))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert seen == []


def test_client_refuses_server_not_named_in_its_certificate(tmp_path):
    d = create_certs(tmp_path, num_clients=1, server_names=["server.example"])["dir"]
    with _server(d) as (port, seen):
        with pytest.raises(grpc.RpcError) as err:
            _call(port, client_credentials(d, 0))  # dials 127.0.0.1, which the certificate does not name
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert seen == []


def test_overwrite_refused_unless_asked(tmp_path):
    first = create_certs(tmp_path, num_clients=3, server_names=["localhost"])
    old_ca = first["ca"].read_bytes()
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        create_certs(tmp_path, num_clients=1)
    assert first["ca"].read_bytes() == old_ca
    second = create_certs(tmp_path, num_clients=1, overwrite=True)
    assert second["ca"].read_bytes() != old_ca
    assert sorted(p.name for p in tmp_path.glob("client-*")) == ["client-0.key", "client-0.pem"]


def test_cert_errors_name_the_file(tmp_path, certs):
    with pytest.raises(CertError, match="missing .*ca.pem"):
        server_credentials(tmp_path)  # empty directory: ca.pem is checked first
    (tmp_path / "ca.pem").write_bytes(certs["ca"].read_bytes())
    with pytest.raises(CertError, match="server.pem"):
        server_credentials(tmp_path)
    with pytest.raises(CertError, match="client-7.pem"):
        client_credentials(certs["dir"], 7)
    (tmp_path / "client-0.pem").write_bytes(certs["clients"][0][0].read_bytes())
    (tmp_path / "client-0.key").write_bytes(certs["clients"][1][1].read_bytes())
    with pytest.raises(CertError, match="client-0.key"):  # key of another client
        client_credentials(tmp_path, 0)
    (tmp_path / "client-0.pem").write_text("garbage")
    with pytest.raises(CertError, match="not a PEM certificate: .*client-0.pem"):
        client_credentials(tmp_path, 0)


def test_peer_client_id_parsing():
    def ctx(props):
        return SimpleNamespace(auth_context=lambda: props)

    assert peer_client_id(ctx({"x509_common_name": [b"client-3"]})) == 3
    assert peer_client_id(ctx({"x509_common_name": [b"client-12"]})) == 12
    assert peer_client_id(ctx({"transport_security_type": [b"insecure"]})) is None
    assert peer_client_id(ctx({"x509_common_name": [b"server"]})) is None
    assert peer_client_id(ctx({"x509_common_name": [b"client-x"]})) is None
    assert peer_client_id(ctx({"x509_common_name": [b"client-1", b"client-2"]})) is None
    assert peer_client_id(None) is None


@pytest.mark.parametrize("host,expected", [
    ("localhost", True), ("LOCALHOST", True), ("127.0.0.1", True), ("127.8.9.10", True),
    ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False), ("192.168.1.1", False),
    ("example.com", False), ("localhost.example.com", False), ("128.0.0.1", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected
