"""Entry points of a deployment: `serve` (main server + fed server in one process) and `client` (one
data owner). Mutual TLS unless --insecure, which is allowed on loopback addresses only.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from .certs import client_credentials, is_loopback, server_credentials, tls_refusal
from ..config import Config, ConfigError
from .client import serve_client
from .codec import METHOD, SERVICE
from .server import Hub

def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host.strip("[]")


def _port(address: str) -> int:
    text = address.rsplit(":", 1)[1] if ":" in address else ""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"address {address!r}: expected HOST:PORT with a port in 0..65535")
    return int(text)


def _check(cfg: Config, address: str, insecure: bool) -> None:
    from .. import strategies

    if not strategies.for_config(cfg).deployable:
        deployable = ", ".join(n for n, c in strategies.all_strategies().items() if c.deployable)
        raise ConfigError(f"strategy.name: {cfg.strategy.name} cannot be deployed (deployable: {deployable})")
    if ":" not in address:
        raise ConfigError(f"address {address!r}: expected HOST:PORT")
    _port(address)
    if insecure and not is_loopback(_host(address)):
        raise ConfigError(f"--insecure: plaintext is allowed on loopback addresses only, not {_host(address)}")


def _options(max_bytes: int) -> list[tuple[str, int]]:
    # so_reuseport 0: a second server on the same address fails to bind instead of sharing the clients
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes),
            ("grpc.enable_http_proxy", 0), ("grpc.so_reuseport", 0)]


def _check_free(address: str) -> None:
    """Refuse at once (before the model loads) an address this machine cannot listen on or that another
    process (another `splitlora serve`) already uses."""
    host, port = _host(address), _port(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--address: cannot resolve {host!r} ({e.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC does: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as e:
            reason = "the port is in use (another server?)" if e.errno == errno.EADDRINUSE else e.strerror
            raise ConfigError(f"--address: cannot listen on {address}: {reason}") from None


def start_server(hub: Hub, address: str, certs: str | None, insecure: bool = False):
    """(grpc server, bound port): listening for `hub`'s sessions with its message limit."""
    # spare threads beyond what sessions can hold, for the refusals; further calls are refused by gRPC
    workers = hub.threads_needed + 8
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=_options(hub.max_bytes),
                         maximum_concurrent_rpcs=workers)
    handler = grpc.stream_stream_rpc_method_handler(hub.session)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    try:
        port = server.add_insecure_port(address) if insecure else \
            server.add_secure_port(address, server_credentials(certs))
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(f"--address: cannot listen on {address} (the port is in use, or not this machine's)")
    server.start()
    return server, port


def serve(cfg: Config, address: str, certs: str | None, output: str, resume: bool = False,
          insecure: bool = False, progress: bool = True, on_listening=None) -> dict:
    """Run the server side of a deployed training run to its end; the run directory is as in-process.

    Everything that can be checked alone is checked before any client is waited for: the address, the
    certificates, the resume checkpoint, then the config, data and model (the run is built first)."""
    from ..checkpoint import latest_checkpoint
    from ..train import train

    _check(cfg, address, insecure)
    if not insecure:
        if certs is None:
            raise ConfigError("--certs: a certificate directory is required (or --insecure on loopback)")
        server_credentials(certs)   # the files are readable and form a key pair
    _check_free(address)
    if resume and latest_checkpoint(Path(output) / "checkpoint") is None:
        raise ConfigError(f"--resume: {output} holds no complete checkpoint (checkpoint/ or checkpoint.old/); "
                          "a run that stopped before its first checkpoint starts again without --resume "
                          "(in a new or emptied directory)")
    # a checkpoint at every aggregation, so a restarted server never applies a round twice
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"checkpoint_interval": cfg.strategy.aggregation_interval})})
    hub = Hub(cfg.strategy.num_clients, cfg.deploy.timeout_s, cfg.wire.precision, secure=not insecure,
              hello_timeout_s=cfg.deploy.hello_timeout_s, max_pending=cfg.deploy.max_pending_sessions)
    servers = []

    def listen(run) -> None:   # the run is built: its sizes set the message limit
        server, port = start_server(hub, address, certs, insecure)
        servers.append(server)
        print(f"splitlora: serving on port {port}; waiting for {cfg.strategy.num_clients} clients",
              file=sys.stderr, flush=True)
        if on_listening:
            on_listening(port, hub)
        hub.wait_for_clients(cfg.deploy.join_timeout_s)

    try:
        summary = train(cfg, output, resume=output if resume else None, progress=progress, hub=hub, on_built=listen)
        summary["wire"] = {**hub.stats.state_dict(), "checkpoint": hub.checkpoint_stats.state_dict()}
        summary["refused_sessions"] = hub.refused
        (Path(output) / "summary.json").write_text(json.dumps(summary, indent=2))
        hub.finish()
        return summary
    finally:
        for server in servers:
            server.stop(grace=2)


def client(cfg: Config, client_id: int, server_address: str, certs: str | None, insecure: bool = False,
           progress: bool = False) -> None:
    """Run one data owner until the server says training is over; shows the server's step (a bar, or
    a line every `train.log_interval` steps). A server that refuses this client's certificate or identity
    stops it at once, saying why; an unreachable server is retried (`deploy.retries`)."""
    from tqdm import tqdm

    from .limits import message_limits
    from ..train import client_role

    _check(cfg, server_address, insecure)
    if not insecure:
        if certs is None:
            raise ConfigError("--certs: a certificate directory is required (or --insecure on loopback)")
        creds = client_credentials(certs, client_id)
    log = lambda m: print(f"splitlora: {m}", file=sys.stderr, flush=True)  # noqa: E731
    role = client_role(cfg, client_id)
    log(f"client {client_id}: {role.num_samples} examples; connecting to {server_address}")
    bar = tqdm(total=cfg.train.max_steps, desc=f"client {client_id}", disable=not progress, dynamic_ncols=True)

    def on_step(step: int) -> None:
        if progress:
            bar.update(max(0, step - bar.n))
        elif step % cfg.train.log_interval == 0 and step != getattr(on_step, "last", None):
            on_step.last = step
            log(f"client {client_id}: step {step}/{cfg.train.max_steps}")

    from .. import strategies

    shapes = {k: tuple(p.shape) for k, p in role.part.adapter.items()}
    max_bytes, max_header = message_limits(role.part.config.hidden_size, cfg.train.batch_size, cfg.data.max_length,
                                           shapes, strategies.for_config(cfg).message_numel(role.part,
                                                                                                cfg.strategy.num_clients))
    if cfg.deploy.max_message_mb is not None:
        max_bytes = cfg.deploy.max_message_mb << 20
    options = _options(max_bytes)
    if insecure:
        factory = lambda: grpc.insecure_channel(server_address, options=options)  # noqa: E731
        diagnose = None
    else:
        factory = lambda: grpc.secure_channel(server_address, creds, options=options)  # noqa: E731
        diagnose = lambda: tls_refusal(server_address, certs, client_id)  # noqa: E731
    try:
        serve_client(role, factory, client_id, cfg.wire.precision, retries=cfg.deploy.retries,
                     max_bytes=max_bytes, max_header=max_header, log=log, on_step=on_step, diagnose=diagnose,
                     max_backoff_s=cfg.deploy.max_backoff_s)
    finally:
        bar.close()
