"""Certificates for the networked deployment: a private CA, a server certificate and one per client.

The gRPC transport uses mutual TLS, so the server knows which client it is talking to (from the
client certificate's CommonName, `client-{i}`) and nobody without a certificate from this CA can join
or read the traffic. `create_certs` makes the whole set; the server needs `ca.pem`, `server.pem`,
`server.key`, client i needs `ca.pem`, `client-{i}.pem`, `client-{i}.key`. `ca.key` is needed only to
issue more certificates and should not be copied to any machine that runs the protocol.
Plaintext (`--insecure`) is allowed only on loopback, see `is_loopback`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import CertError

_CLIENT_CN = re.compile(r"client-(\d+)")



def create_certs(output_dir, num_clients: int,
                 server_names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
                 days: int = 365, overwrite: bool = False) -> dict:
    """Write ca.pem/ca.key, server.pem/server.key and client-{i}.pem/client-{i}.key (i < num_clients).

    `server_names` are the host names and IP addresses the clients will dial; each becomes a
    SubjectAlternativeName of the server certificate (TLS checks the dialled name against them).
    Returns the paths: {"dir", "ca", "ca_key", "server", "server_key", "clients": [(cert, key), ...]}.
    """
    out = Path(output_dir)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    server_names = list(server_names)
    if not server_names:
        raise ValueError("server_names must name at least one host or IP address")
    if (out / "ca.pem").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds certificates (ca.pem); pass overwrite=True "
                              f"(--overwrite) to replace them all, which invalidates the old ones")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # clients beyond the new num_clients would otherwise keep certs of the old CA
        for stale in [*out.glob("client-*.pem"), *out.glob("client-*.key")]:
            stale.unlink()

    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # 5 min for clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("splitlora CA")
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), start, end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(cert_sign=True), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    paths = {"dir": out, "ca": _write_cert(out / "ca.pem", ca_cert),
             "ca_key": _write_key(out / "ca.key", ca_key)}

    def leaf(stem: str, common_name: str, sans: list, usage) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (_builder(_name(common_name), ca_name, key.public_key(), start, end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(cert_sign=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        return _write_cert(out / f"{stem}.pem", cert), _write_key(out / f"{stem}.key", key)

    paths["server"], paths["server_key"] = leaf(
        "server", server_names[0], [_san(n) for n in server_names], ExtendedKeyUsageOID.SERVER_AUTH)
    paths["clients"] = [leaf(f"client-{i}", f"client-{i}", [x509.DNSName(f"client-{i}")],
                             ExtendedKeyUsageOID.CLIENT_AUTH) for i in range(num_clients)]
    return paths


def server_credentials(certs_dir) -> grpc.ServerCredentials:
    """TLS credentials for the server; clients must present a certificate issued by ca.pem."""
    d = Path(certs_dir)
    ca = _read_cert(d / "ca.pem")
    cert, key = _read_pair(d / "server.pem", d / "server.key")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def client_credentials(certs_dir, client_id: int) -> grpc.ChannelCredentials:
    """TLS credentials for client `client_id`: its own certificate, and ca.pem to check the server."""
    d = Path(certs_dir)
    ca = _read_cert(d / "ca.pem")
    cert, key = _read_pair(d / f"client-{client_id}.pem", d / f"client-{client_id}.key")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def tls_refusal(address: str, certs_dir, client_id: int, timeout_s: float = 10.0) -> str | None:
    """Why the server at `address` refuses client `client_id`'s TLS session, or None if it cannot be
    reached (retry) or does not refuse it. gRPC reports a rejected certificate as a closed socket, which
    looks like an unreachable server; a plain TLS handshake with the same files tells them apart."""
    import socket
    import ssl

    d = Path(certs_dir)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(d / "ca.pem"))
    context.load_cert_chain(str(d / f"client-{client_id}.pem"), str(d / f"client-{client_id}.key"))
    context.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError:
        return None   # unreachable: not a refusal
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            # TLS 1.3: the server judges the client's certificate after the handshake; its alert comes
            # with the first read (an HTTP/2 preface makes the server speak at once)
            tls.settimeout(timeout_s)
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            if tls.recv(1) == b"":   # a server that accepts the session answers with its HTTP/2 settings
                return (f"the server closed the TLS session after the handshake: it does not accept "
                        f"{d / f'client-{client_id}.pem'} (issued by another CA?)")
    except ssl.SSLCertVerificationError as e:
        return f"the server's certificate does not verify against {d / 'ca.pem'} ({e.verify_message})"
    except ssl.SSLError as e:
        return f"the server refused the TLS session ({e.reason or e}): is {d / f'client-{client_id}.pem'} " \
               "issued by the server's CA?"
    except OSError:
        return None
    finally:
        raw.close()
    return None


def peer_client_id(context) -> int | None:
    """The client index i of the peer's verified certificate (CommonName `client-{i}`), else None."""
    try:
        values = context.auth_context().get("x509_common_name") or []
    except AttributeError:  # no context (None), or an object without auth_context
        return None
    ids = {m.group(1) for v in values
           if (m := _CLIENT_CN.fullmatch(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)))}
    return int(ids.pop()) if len(ids) == 1 else None


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or IP address, IPv6 possibly in brackets) stays on this machine."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # other names may resolve anywhere
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1
    return ip.is_loopback


# ---------------------------------------------------------------------------------------- helpers

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitlora"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject, issuer, public_key, start, end) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                         key_agreement=False, encipher_only=False, decipher_only=False)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key) -> Path:
    """Unencrypted PKCS#8 (gRPC cannot read encrypted keys), readable by the owner only."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(data)
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"missing {path} (create the set with `splitlora certs --output DIR "
                        f"--clients N`)") from None
    except OSError as e:
        raise CertError(f"cannot read {path}: {e.strerror}") from None


def _read_cert(path: Path) -> bytes:
    data = _read(path)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertError(f"not a PEM certificate: {path}") from None
    if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise CertError(f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}: {path}")
    return data


def _read_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    cert_pem, key_pem = _read_cert(cert_path), _read(key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CertError(f"not an unencrypted PEM private key: {key_path}") from None
    if key.public_key() != x509.load_pem_x509_certificate(cert_pem).public_key():
        raise CertError(f"private key {key_path} does not belong to certificate {cert_path}")
    return cert_pem, key_pem
