"""Entry points of a deployment: `serve` (main server + fed server in one process) and `client` (one
data owner). Mutual TLS unless --insecure, which is allowed on loopback addresses only.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from .certs import client_credentials, is_loopback, server_credentials
from .config import Config, ConfigError
from .remote import METHOD, SERVICE, Hub, serve_client

DEPLOYED = ("splitlora", "sl", "fedlora")


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host.strip("[]")


def _check(cfg: Config, address: str, insecure: bool) -> None:
    if cfg.strategy.name not in DEPLOYED:
        raise ConfigError(f"strategy.name: {cfg.strategy.name} cannot be deployed (deployable: {', '.join(DEPLOYED)})")
    if ":" not in address:
        raise ConfigError(f"address {address!r}: expected HOST:PORT")
    if insecure and not is_loopback(_host(address)):
        raise ConfigError(f"--insecure: plaintext is allowed on loopback addresses only, not {_host(address)}")


def _options(cfg: Config) -> list[tuple[str, int]]:
    limit = cfg.deploy.max_message_mb << 20
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            ("grpc.enable_http_proxy", 0)]


def start_server(cfg: Config, address: str, certs: str | None, insecure: bool = False):
    """(grpc server, hub, bound port): listening, sessions not yet joined."""
    _check(cfg, address, insecure)
    hub = Hub(cfg.strategy.num_clients, cfg.deploy.timeout_s, cfg.wire.precision, secure=not insecure,
              max_bytes=cfg.deploy.max_message_mb << 20, hello_timeout_s=cfg.deploy.hello_timeout_s,
              max_pending=cfg.deploy.max_pending_sessions)
    # spare threads beyond what sessions can hold, for the refusals; further calls are refused by gRPC
    workers = hub.threads_needed + 8
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=_options(cfg),
                         maximum_concurrent_rpcs=workers)
    handler = grpc.stream_stream_rpc_method_handler(hub.session)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    if insecure:
        port = server.add_insecure_port(address)
    else:
        if certs is None:
            raise ConfigError("--certs: a certificate directory is required (or --insecure on loopback)")
        port = server.add_secure_port(address, server_credentials(certs))
    if port == 0:
        raise ConfigError(f"--address: cannot listen on {address}")
    server.start()
    return server, hub, port


def serve(cfg: Config, address: str, certs: str | None, output: str, resume: bool = False,
          insecure: bool = False, progress: bool = True, on_listening=None) -> dict:
    """Run the server side of a deployed training run to its end; the run directory is as in-process."""
    from .train import train

    # a checkpoint at every aggregation, so a restarted server never applies a round twice
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"checkpoint_interval": cfg.strategy.aggregation_interval})})
    server, hub, port = start_server(cfg, address, certs, insecure)
    print(f"splitlora: serving on port {port}; waiting for {cfg.strategy.num_clients} clients", file=sys.stderr)
    if on_listening:
        on_listening(port, hub)
    try:
        hub.wait_for_clients(cfg.deploy.join_timeout_s)
        resume_dir = output if resume and (Path(output) / "checkpoint").exists() else None
        summary = train(cfg, output, resume=resume_dir, progress=progress, hub=hub)
        summary["wire"] = hub.stats.state_dict()
        summary["refused_sessions"] = hub.refused
        (Path(output) / "summary.json").write_text(__import__("json").dumps(summary, indent=2))
        hub.finish()
        return summary
    finally:
        server.stop(grace=2)


def client(cfg: Config, client_id: int, server_address: str, certs: str | None, insecure: bool = False,
           progress: bool = False) -> None:
    """Run one data owner until the server says training is over; shows the server's step (a bar, or
    a line every `train.log_interval` steps)."""
    from tqdm import tqdm

    from .train import client_role

    _check(cfg, server_address, insecure)
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
    options = _options(cfg)
    if insecure:
        factory = lambda: grpc.insecure_channel(server_address, options=options)  # noqa: E731
    else:
        if certs is None:
            raise ConfigError("--certs: a certificate directory is required (or --insecure on loopback)")
        creds = client_credentials(certs, client_id)
        factory = lambda: grpc.secure_channel(server_address, creds, options=options)  # noqa: E731
    try:
        serve_client(role, factory, client_id, cfg.wire.precision, retries=cfg.deploy.retries,
                     max_bytes=cfg.deploy.max_message_mb << 20, log=log, on_step=on_step)
    finally:
        bar.close()
