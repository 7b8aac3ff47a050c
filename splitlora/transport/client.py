"""The client side of a deployment: `serve_client` holds the client's session (hello, then one reply per
command, reconnecting with bounded backoff), and `answer` carries out each command of the message table
(`contract.COMMANDS`) with the `roles.Client` method of the same name. What the server sends is
checked too: a gradient must match the pending activations and every tensor must be finite.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import torch

from ..checkpoint import join_tensors, split_tensors
from ..contract import COMMANDS, FOLD_MODES
from ..learning import ClientDropped
from .checks import count_of
from .codec import FULL_METHOD, BadMessage, pack, parse_fold, parse_layout, unpack


def serve_client(client, channel_factory, client_id: int, precision: str = "fp32", retries: int = 10,
                 backoff_s: float = 0.5, max_bytes: int = 256 << 20, log=print, on_step=None,
                 max_header: int = 1 << 20, diagnose=None, max_backoff_s: float = 30.0) -> None:
    """Run one client role against the server until it says done; reconnect with bounded backoff.

    `on_step(step)` is called with the steps done after each training command (for progress). A refusal
    (certificate, identity, a message out of bounds at the door) stops at once: ConnectionRefusedError
    with the server's reason. When the server cannot be reached, `diagnose()` (if given) may tell a TLS
    refusal from an unreachable server (a certificate the server rejects looks like a closed socket to
    gRPC); otherwise it retries. The hello says how many steps this client has done, so a server whose
    run is older can resynchronise it (load_state_dict, or reset for a new run)."""
    fatal = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND}
    initial = {k: v for k, v in client.state_dict().items() if k != "noise"}   # for a server's `reset`
    progress = {"step": 0}
    attempt = 0
    while True:
        outbox: queue.Queue = queue.Queue()
        outbox.put(pack("hello", meta={"client_id": client_id, "num_samples": client.num_samples,
                                       "num_trainable": client.num_trainable, "step": progress["step"]}))
        channel = channel_factory()
        admitted = False   # a refusal before the first command is the door's: retrying cannot help
        try:
            replies = channel.stream_stream(FULL_METHOD)(iter(outbox.get, None))
            for data in replies:
                attempt, admitted = 0, True
                try:
                    kind, tensors, meta = unpack(data, max_bytes, max_header)
                except BadMessage as e:
                    raise ConnectionError(f"client {client_id}: the server sent a malformed message: {e}") from None
                if kind == "done":
                    outbox.put(None)
                    _finish(replies)
                    log(f"client {client_id}: training finished")
                    return
                if kind in ("reset", "load_state_dict") and progress["step"] > meta.get("server_step", 0):
                    log(f"client {client_id}: the server's run is at step {meta.get('server_step', 0)}, this client "
                        f"was at step {progress['step']}: taking the server's state")
                outbox.put(answer(client, kind, tensors, meta, precision, initial))
                if kind in ("reset", "load_state_dict") and isinstance(meta.get("server_step"), int):
                    progress["step"] = meta["server_step"]
                elif isinstance(meta.get("step"), int):
                    progress["step"] = meta["step"] + 1
                    if on_step is not None:
                        on_step(progress["step"])
            log(f"client {client_id}: session ended by the server; reconnecting")
        except grpc.RpcError as e:
            if e.code() in fatal or (e.code() == grpc.StatusCode.INVALID_ARGUMENT and not admitted):
                raise ConnectionRefusedError(f"server refused client {client_id}: {e.details()}") from None
            why = diagnose() if diagnose is not None and e.code() == grpc.StatusCode.UNAVAILABLE else None
            if why:
                raise ConnectionRefusedError(f"client {client_id}: cannot connect: {why}") from None
            log(f"client {client_id}: {e.code().name}: {e.details()}")
        finally:
            outbox.put(None)
            channel.close()
        attempt += 1
        if attempt > retries:
            raise ConnectionError(f"client {client_id}: gave up after {retries} reconnection attempts")
        time.sleep(min(backoff_s * 2 ** (attempt - 1), max_backoff_s))


def _finish(replies, wait_s: float = 10.0) -> None:
    """Let the server end the call after `done` (it does at once), cancelling it if it has not within
    `wait_s`: closing a channel with a call still open waits for that call, which may never end."""
    timer = threading.Timer(wait_s, replies.cancel)
    timer.daemon = True
    timer.start()
    try:
        for _ in replies:
            pass
    except grpc.RpcError:   # the server went away, or the call was cancelled: either way it is over
        pass
    finally:
        timer.cancel()


class Refused(Exception):
    """A command this client cannot carry out as sent; the text goes back as an error reply."""


def _forward(client, tensors, meta, initial):
    msg, n = client.forward()
    return msg, {"n": n}


def _backward(client, tensors, meta, initial):
    grad = tensors.get("activations_grad")
    if meta.get("no_grad") is True and not tensors:   # DLoRA killed the whole bottom: only the top steps
        if client.pending is None or getattr(client.part, "top", None) is None:
            raise Refused("backward: no gradient, but no pending U-shaped batch")
    elif client.pending is None or grad is None or grad.shape != client.pending.shape:
        raise Refused("backward: the gradient does not match the pending activations")
    client.backward(grad, int(meta["step"]))
    return {}, {}


def _top_step(client, tensors, meta, initial):
    x = tensors.get("activations")
    if client.pending is None or x is None or x.shape != client.pending.shape \
            or getattr(client.part, "top", None) is None:
        raise Refused("top_step: the activations do not match the pending batch")
    reply, loss = client.top_step(x)
    return reply, {"loss": loss.smoothed, "ce": loss.ce, "n": int(x.shape[0])}


def _local_step(client, tensors, meta, initial):
    loss, n = client.local_step(int(meta["step"]))
    return {}, {"loss": loss.smoothed, "ce": loss.ce, "n": n, "shape": list(client.last_shape)}


def _set_frozen(client, tensors, meta, initial):
    keys = meta.get("keys")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise Refused("set_frozen: keys must be a list of adapter tensor names")
    client.set_frozen(set(keys))
    return {}, {}


def _ranks(meta, kind: str) -> dict:
    ranks = meta.get("ranks")
    if not (isinstance(ranks, dict) and all(count_of(r) for r in ranks.values())):
        raise Refused(f"{kind}: needs ranks (module -> rank >= 1)")
    return ranks


def _set_layout(client, tensors, meta, initial):
    if not count_of(meta.get("split")):
        raise Refused("set_layout: needs a split >= 1")
    client.set_layout(meta["split"], _ranks(meta, "set_layout"), *parse_layout(tensors))
    return {}, {}


def _fold(client, tensors, meta, initial):
    factors, rows, adapter = parse_fold(tensors)
    if meta.get("mode") not in FOLD_MODES:
        raise Refused(f"fold: mode must be one of {', '.join(FOLD_MODES)}")
    client.fold(factors, _ranks(meta, "fold"), rows, meta["mode"], adapter)
    return {}, {}


def _load_adapter_state(client, tensors, meta, initial):
    client.load_adapter_state(tensors)
    return {}, {}


def _state_dict(client, tensors, meta, initial):   # the noise generator's state stays here (it would undo the noise)
    out: dict[str, torch.Tensor] = {}
    state = {k: v for k, v in client.state_dict().items() if k != "noise"}
    return out, {"state": split_tensors(state, out)}


def _load_state_dict(client, tensors, meta, initial):
    client.load_state_dict(join_tensors(meta["state"], tensors))
    return {}, {}


def _reset(client, tensors, meta, initial):   # a new run on the server: start over
    if initial is None:
        raise Refused("reset: no initial state kept")
    client.load_state_dict(initial)
    return {}, {}


# one handler per command of the message table: (client, tensors, meta, initial state) -> (tensors, meta)
HANDLERS = {"forward": _forward, "backward": _backward, "top_step": _top_step, "local_step": _local_step,
            "adapter_state": lambda c, t, m, i: (c.adapter_state(), {}),
            "peek_adapter_state": lambda c, t, m, i: (c.peek_adapter_state(), {}),
            "load_adapter_state": _load_adapter_state, "set_frozen": _set_frozen, "set_layout": _set_layout,
            "fold": _fold, "state_dict": _state_dict, "load_state_dict": _load_state_dict, "reset": _reset}


def answer(client, kind: str, tensors: dict, meta: dict, precision: str, initial: dict | None = None) -> bytes:
    """Carry out one server command with the client role; the reply message (echoing the command's nonce).
    A command that is not in the table, holds non-finite values, or does not fit this client's state is
    answered with an error; a step whose values turn non-finite is skipped and reported as an error."""
    cmd = COMMANDS.get(kind)
    try:
        if cmd is None or kind not in HANDLERS:
            raise Refused(f"unknown command {kind!r}")
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise Refused(f"{kind}: {name} holds NaN or infinite values")
        out, reply_meta = HANDLERS[kind](client, tensors, meta, initial)
        reply, lossy = cmd.reply, cmd.lossy_reply
        reply_meta = {**reply_meta, "compute_s": client.compute_s}
    except (Refused, ClientDropped) as e:   # ClientDropped: a skipped step (BadUpdate), or no layout yet
        reply, out, reply_meta, lossy = "error", {}, {"error": str(e)}, False
    except (KeyError, ValueError, TypeError, RuntimeError) as e:   # a command that does not fit this client
        reply, out, reply_meta, lossy = "error", {}, {"error": f"{kind}: {type(e).__name__}: {e}"}, False
    return pack(reply, out, {**reply_meta, "nonce": meta.get("nonce")}, precision if lossy else "fp32")
