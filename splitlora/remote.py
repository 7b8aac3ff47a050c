"""Networked transport: one server process (main server + fed server) and one process per client,
over gRPC with mutual TLS.

Each client holds one bidirectional stream, its session. The server runs the very strategy the
simulator runs; it reaches client i through `RemoteClient`, whose methods (forward, backward,
adapter_state, ...) send a command down the session and wait for the reply. The client process
builds the same `Client` role and answers the commands by calling its methods. Every message is a
safetensors blob (tensors plus metadata {"kind", "meta": JSON}); every reply the server receives is
validated (kind, keys, shapes, dtypes, finite values, size) and a bad one ends that session with
INVALID_ARGUMENT, the client drops out of the round, and the server goes on.
"""

from __future__ import annotations

import json
import queue
import secrets
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import torch
from safetensors.torch import load as st_load

from .checkpoint import join_tensors, split_tensors
from .limits import HELLO_HEADER, ValueBounds, check_values
from .roles import BadUpdate, ClientDropped, Loss
from .wire import dequantize, encode, fold_message, layout_message, parse_fold, parse_layout

SERVICE, METHOD = "splitlora.Split", "Session"
FULL_METHOD = f"/{SERVICE}/{METHOD}"


class BadMessage(ValueError):
    """A message that is not what the protocol expects here; the text says why."""


def pack(kind: str, tensors: dict | None = None, meta: dict | None = None, precision: str = "fp32") -> bytes:
    return encode(tensors or {}, precision, {"kind": kind, "meta": json.dumps(meta or {})})


def unpack(data: bytes, max_bytes: int, max_header: int = HELLO_HEADER) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(kind, tensors, meta) of a message, or BadMessage. Sizes are checked before anything is parsed."""
    if len(data) > max_bytes:
        raise BadMessage(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    if len(data) < 8:
        raise BadMessage("not a splitlora message (shorter than a safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > max_header:
        raise BadMessage(f"a header of {n} bytes exceeds the {max_header}-byte bound for this run's messages")
    try:
        header = json.loads(data[8:8 + n])
        info = header.get("__metadata__") or {}
        kind, meta = info["kind"], json.loads(info.get("meta", "{}"))
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is the sender's fault
        raise BadMessage(f"not a splitlora message ({type(e).__name__})") from None
    try:
        tensors = dequantize(tensors)
    except ValueError as e:
        raise BadMessage(str(e)) from None
    if not isinstance(meta, dict):
        raise BadMessage("message metadata is not a JSON object")
    return kind, tensors, meta


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(float(x)) < float("inf")


def _count(x) -> int:
    """x if it is an int in [1, 2**31), else 0."""
    return x if isinstance(x, int) and not isinstance(x, bool) and 1 <= x < 2 ** 31 else 0


@dataclass
class Expectations:
    """What replies from clients must look like (sizes and value bounds: `limits`)."""

    hidden: int
    vocab: int
    batch_size: int
    max_length: int
    adapter_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    max_bytes: int = 256 << 20
    labels: bool = True    # False under the U-shaped split: the client keeps its labels
    max_header: int = 1 << 20
    bounds: ValueBounds = field(default_factory=ValueBounds)
    act_dtypes: tuple = (torch.float32,)   # what activations and their gradients may arrive as (runtime, wire)
    num_samples: int | None = None   # the client's share of the data as the run partitions it


def _names(dtypes) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def _finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise BadMessage(f"{name} holds NaN or infinite values")


def check_smashed(t: dict[str, torch.Tensor], e: Expectations) -> None:
    keys = {"activations", "attention_mask", "labels"} if e.labels else {"activations", "attention_mask"}
    if set(t) != keys:
        raise BadMessage(f"smashed message needs {', '.join(sorted(keys))}; got {sorted(t)}")
    a, m = t["activations"], t["attention_mask"]
    if a.dtype not in e.act_dtypes or a.dim() != 3 or a.shape[2] != e.hidden:
        raise BadMessage(f"activations must be {_names(e.act_dtypes)} [B, T, {e.hidden}], got {a.dtype} "
                         f"{list(a.shape)}")
    b, n = a.shape[:2]
    if not (1 <= b <= e.batch_size and 1 <= n <= e.max_length):
        raise BadMessage(f"activations of shape {list(a.shape)} exceed batch {e.batch_size} x {e.max_length}")
    if m.dtype != torch.bool or list(m.shape) != [b, n]:
        raise BadMessage(f"attention_mask must be bool [{b}, {n}], got {m.dtype} {list(m.shape)}")
    if not m.any(dim=1).all():
        raise BadMessage("attention_mask selects no token in some example")
    _finite("activations", a)
    if (why := check_values("activations", a, e.bounds.act_norm, e.bounds.act_abs)) is not None:
        raise BadMessage(why)
    if not e.labels:
        return
    y = t["labels"]
    if y.dtype != torch.int32 or list(y.shape) != [b, n]:
        raise BadMessage(f"labels must be int32 [{b}, {n}], got {y.dtype} {list(y.shape)}")
    if ((y != -100) & ((y < 0) | (y >= e.vocab))).any():
        raise BadMessage("labels outside the vocabulary")
    if not (y[:, 1:] != -100).any():
        raise BadMessage("labels supervise no token")


def check_adapter(t: dict[str, torch.Tensor], e: Expectations, frozen=frozenset()) -> None:
    """An adapter a client sends: its part's tensors, less the `frozen` ones (DLoRA's killed modules)."""
    keys = set(e.adapter_shapes) - set(frozen)
    if set(t) != keys:
        raise BadMessage(f"adapter keys differ from the client part's ({len(t)} vs {len(keys)})")
    for k, v in t.items():
        if v.dtype != torch.float32 or tuple(v.shape) != e.adapter_shapes[k]:
            raise BadMessage(f"adapter tensor {k}: {v.dtype} {list(v.shape)}, expected {e.adapter_shapes[k]}")
        _finite(k, v)


class Session:
    """One connected client stream: commands go to `outbox`, replies arrive in `inbox`."""

    def __init__(self):
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.closed = threading.Event()

    def close(self, code=None, details: str = "") -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.outbox.put(("end", code, details))
            self.inbox.put(None)


@dataclass
class WireStats:
    """Bytes of the messages the server sent (down) and received (up), in total and per client; `log`
    keeps (client, kind, bytes) since the last `take_log()`, as `wire.Link` does, for the cost model."""

    bytes_up: int = 0
    bytes_down: int = 0
    per_client: dict = field(default_factory=dict)
    log: list = field(default_factory=list)

    def add(self, cid: int, up: int = 0, down: int = 0, kind: str = "") -> None:
        self.bytes_up += up
        self.bytes_down += down
        c = self.per_client.setdefault(str(cid), {"bytes_up": 0, "bytes_down": 0})
        c["bytes_up"] += up
        c["bytes_down"] += down
        self.log.append((cid, kind, up + down))

    def take_log(self) -> list[tuple[int, str, int]]:
        log, self.log = self.log, []
        return log

    def state_dict(self) -> dict:
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "per_client": self.per_client}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_up, self.bytes_down = state["bytes_up"], state["bytes_down"]
        self.per_client = state.get("per_client", {})


# what the cost model calls each message (commands, acknowledgements and checkpoint reads have no kind)
_LOG_KIND = {"smashed": "smashed", "backward": "grad", "adapter": "adapter_up", "load_adapter_state": "adapter_down",
             "top_step": "server_activations", "top": "top_grad", "fold": "adapter_down", "set_layout": "layout"}


class RemoteClient:
    """The server's handle on client `cid`: the client role's methods, carried out over its session."""

    def __init__(self, cid: int, hub: "Hub"):
        self.cid, self.hub = cid, hub
        self.session: Session | None = None
        self.num_samples = self.num_trainable = 0
        self.hello_step = 0        # steps the client had done when it said hello (state of an earlier run)
        self.compute_s = 0.0
        self.last_shape: tuple[int, int] = (0, 0)
        self.expect: Expectations | None = None
        self.frozen: set | None = set()   # adapter keys the client was told to freeze (None: unknown)
        self.incarnation = 0       # sessions so far: a new one may be a new process, with none of the old state

    @property
    def connected(self) -> bool:
        return self.session is not None and not self.session.closed.is_set()

    def _call(self, kind: str, tensors=None, meta=None, reply: str = "ack", lossy: bool = False,
              count: bool = True):
        session = self.session
        if session is None or session.closed.is_set():
            raise ClientDropped(f"client {self.cid}: not connected")
        nonce = secrets.randbits(62)   # the reply must echo it: a stale or replayed reply cannot
        data = pack(kind, tensors, {**(meta or {}), "nonce": nonce}, self.hub.precision if lossy else "fp32")
        stats = self.hub.stats if count else WireStats()   # evaluation reads are measurements, not traffic
        stats.add(self.cid, down=len(data), kind=_LOG_KIND.get(kind, "command"))
        sent = time.monotonic()
        session.outbox.put(("msg", data))
        try:
            answer = session.inbox.get(timeout=self.hub.timeout_s)
        except queue.Empty:
            session.close(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply to {kind} in {self.hub.timeout_s} s")
            raise ClientDropped(f"client {self.cid}: missed the {self.hub.timeout_s} s deadline for {kind}") from None
        if answer is None:
            raise ClientDropped(f"client {self.cid}: disconnected")
        stats.add(self.cid, up=len(answer), kind=_LOG_KIND.get(reply, "reply"))
        elapsed = time.monotonic() - sent
        try:
            got, out, rmeta = unpack(answer, self.expect.max_bytes, self.expect.max_header)
            if got == "error" and isinstance(rmeta.get("error"), str):
                raise BadMessage(f"it could not carry out {kind}: {rmeta['error'][:300]}")
            if got != reply:
                raise BadMessage(f"expected a {reply!r} reply to {kind}, got {got!r}")
            if reply == "smashed":
                check_smashed(out, self.expect)
                if _count(rmeta.get("n")) != out["activations"].shape[0]:
                    raise BadMessage("smashed reply: n must be the batch size")
            elif reply == "adapter":
                check_adapter(out, self.expect, set() if kind == "peek_adapter_state" else self.frozen or set())
            elif reply == "loss":
                if not (_number(rmeta.get("loss")) and _number(rmeta.get("ce")) and _count(rmeta.get("n"))):
                    raise BadMessage("loss reply needs a finite loss and ce and a positive n")
                shape = rmeta.get("shape")
                if not (isinstance(shape, list) and len(shape) == 2 and all(map(_count, shape))):
                    raise BadMessage("loss reply needs the batch shape [B, T]")
            elif reply == "top":
                sent_x = tensors["activations"]
                g = out.get("activations_grad")
                if set(out) != {"activations_grad"} or g.dtype not in self.expect.act_dtypes \
                        or g.shape != sent_x.shape:
                    raise BadMessage(f"top reply needs activations_grad of shape {list(sent_x.shape)}")
                _finite("activations_grad", g)
                bounds = self.expect.bounds
                if (why := check_values("activations_grad", g, bounds.grad_norm, bounds.grad_abs)) is not None:
                    raise BadMessage(why)
                if not (_number(rmeta.get("loss")) and _number(rmeta.get("ce")) and _count(rmeta.get("n"))):
                    raise BadMessage("top reply needs a finite loss and ce and a positive n")
            elif reply == "state":
                try:
                    out = join_tensors(rmeta["state"], out)
                except Exception:  # noqa: BLE001 - any malformed state is the sender's fault
                    raise BadMessage("state reply is not a client state") from None
            if rmeta.get("nonce") != nonce:   # checked last, so a malformed reply is refused for what is wrong
                raise BadMessage(f"the reply to {kind} answers another command (stale or replayed)")
            if "compute_s" in rmeta:
                c = rmeta["compute_s"]
                if not (_number(c) and c >= 0):
                    raise BadMessage("compute_s must be a finite number >= 0")
                if c > self.compute_s + elapsed + 1.0:   # a lower value: a restarted client process
                    raise BadMessage(f"compute_s grew by {c - self.compute_s:.3g} s during a {elapsed:.3g} s command")
        except BadMessage as e:
            session.close(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise ClientDropped(f"client {self.cid}: refused its message: {e}") from None
        self.compute_s = float(rmeta.get("compute_s", self.compute_s))
        return out, rmeta

    def refuse(self, reason: str) -> None:
        """The strategy refused what this client sent (out of bounds): its session ends, saying why."""
        if self.session is not None:
            self.session.close(grpc.StatusCode.INVALID_ARGUMENT, reason)

    def reset_if_ahead(self) -> None:
        """A run that starts at step 0: a client that reconnected with state from an earlier run (its
        hello says how many steps it has done) is told to start over from its initial state."""
        if self.hello_step > 0:
            self._call("reset", meta={"server_step": 0})
            self.frozen = set()

    def forward(self):
        out, meta = self._call("forward", reply="smashed")
        return out, int(meta["n"])

    def backward(self, activations_grad: torch.Tensor | None, global_step: int) -> None:
        """None: no gradient is sent; the client only steps its top (DLoRA killed its whole bottom)."""
        if activations_grad is None:
            self._call("backward", meta={"step": global_step, "no_grad": True})
        else:
            self._call("backward", {"activations_grad": activations_grad}, {"step": global_step}, lossy=True)

    def top_step(self, server_out: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Loss]:
        out, meta = self._call("top_step", server_out, reply="top", lossy=True)
        return out, Loss(float(meta["loss"]), float(meta["ce"]))

    def local_step(self, global_step: int) -> tuple[Loss, int]:
        _, meta = self._call("local_step", meta={"step": global_step}, reply="loss")
        self.last_shape = tuple(meta["shape"])
        return Loss(float(meta["loss"]), float(meta["ce"])), int(meta["n"])

    def adapter_state(self):
        return self._call("adapter_state", reply="adapter")[0]

    def peek_adapter_state(self):
        return self._call("peek_adapter_state", reply="adapter", count=False)[0]

    def set_frozen(self, keys) -> None:
        self._call("set_frozen", meta={"keys": sorted(keys)})
        self.frozen = set(keys)

    def set_layout(self, split: int, ranks: dict[str, int], adapter: dict, base: dict) -> None:
        self._call("set_layout", layout_message(adapter, base), {"split": split, "ranks": ranks})
        self.frozen = set()
        self.expect.adapter_shapes = {k: tuple(v.shape) for k, v in adapter.items()}   # what it sends from now

    def fold(self, factors, ranks: dict[str, int], rows: dict) -> None:
        self._call("fold", fold_message(factors, rows), {"ranks": ranks})
        shapes = self.expect.adapter_shapes
        for k, s in shapes.items():
            r = ranks[k.rsplit(".lora_", 1)[0]]
            shapes[k] = (r, s[1]) if ".lora_A." in k else (s[0], r)

    def load_adapter_state(self, state) -> None:
        self._call("load_adapter_state", state)

    def state_dict(self) -> dict:
        return self._call("state_dict", reply="state")[0]

    def load_state_dict(self, state: dict) -> None:
        self.compute_s = float(state.get("compute_s", self.compute_s))   # the client's count restarts from it
        self.frozen = set(state.get("frozen", ()))
        tensors: dict[str, torch.Tensor] = {}
        self._call("load_state_dict", tensors, {"state": split_tensors(state, tensors),
                                                "server_step": self.hub.start_step})


class Hub:
    """The server side of all sessions: authenticates clients and hands their streams to the proxies.

    Every session holds one of the gRPC server's worker threads. A session that never says hello is
    cut after `hello_timeout_s`, each client certificate may have at most `max_pending` sessions
    waiting for hello, and all certificates together at most `num_clients + 8`: the rest are refused
    at once with RESOURCE_EXHAUSTED, so silent sessions can never hold every thread."""

    def __init__(self, num_clients: int, timeout_s: float, precision: str = "fp32", secure: bool = True,
                 max_bytes: int = 256 << 20, hello_timeout_s: float = 10.0, max_pending: int = 2):
        self.proxies = [RemoteClient(cid, self) for cid in range(num_clients)]
        self.timeout_s, self.precision, self.secure, self.max_bytes = timeout_s, precision, secure, max_bytes
        self.hello_timeout_s, self.max_pending = hello_timeout_s, max_pending
        self.max_pending_total = num_clients + 8
        self.stats = WireStats()
        self.start_step = 0      # the step the server's run starts (or resumes) at
        self.joined = threading.Condition()
        self._lock = threading.Lock()
        self._pending: Counter = Counter()   # sessions waiting for hello, per certificate (None: insecure)
        self.refused = 0    # sessions refused at the door (bad hello, wrong identity, unknown client, crowd)

    @property
    def threads_needed(self) -> int:
        """Worker threads that joined sessions plus the most pending ones can hold."""
        return len(self.proxies) + self.max_pending_total

    def configure(self, cid: int, expect: Expectations) -> RemoteClient:
        """What client `cid`'s messages must look like; the hub's message limit becomes the largest any
        configured client may send."""
        self.proxies[cid].expect = expect
        self.max_bytes = max(p.expect.max_bytes for p in self.proxies if p.expect is not None)
        return self.proxies[cid]

    def _refuse(self, context, code, details: str):
        with self._lock:
            self.refused += 1
        context.abort(code, details)

    def _admit(self, peer) -> bool:
        with self._lock:
            if (self._pending[peer] >= self.max_pending and self.secure) \
                    or sum(self._pending.values()) >= self.max_pending_total:
                return False
            self._pending[peer] += 1
            return True

    def _release(self, peer) -> None:
        with self._lock:
            self._pending[peer] -= 1

    def session(self, requests, context):
        """gRPC stream-stream handler: hello, then commands out and replies in until the session ends."""
        from .certs import peer_client_id

        peer = peer_client_id(context) if self.secure else None
        if not self._admit(peer):
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"too many sessions waiting for hello{'' if peer is None else f' from client {peer}'}")
        session = Session()

        def read():   # a plain thread per session: messages in, None when the stream ends
            try:
                for data in requests:
                    if session.inbox.qsize() >= 4:   # replies are one per command; these were never asked for
                        session.close(grpc.StatusCode.INVALID_ARGUMENT, "messages that no command asked for")
                        break
                    session.inbox.put(data)
            except grpc.RpcError:
                pass
            session.close()

        threading.Thread(target=read, daemon=True).start()
        try:
            try:
                first = session.inbox.get(timeout=self.hello_timeout_s)
            except queue.Empty:
                self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"no hello within {self.hello_timeout_s} s")
            try:
                if first is None:
                    raise BadMessage("empty session")
                kind, _, meta = unpack(first, self.max_bytes, HELLO_HEADER)
                if kind != "hello":
                    raise BadMessage(f"a session starts with hello, not {kind!r}")
                cid = meta.get("client_id")
                if not isinstance(cid, int) or isinstance(cid, bool) or not 0 <= cid < len(self.proxies):
                    self._refuse(context, grpc.StatusCode.NOT_FOUND, f"unknown client id {cid!r}")
                trainable, step = meta.get("num_trainable"), meta.get("step", 0)
                if not _count(meta.get("num_samples")) or not (_count(trainable) or trainable == 0):
                    raise BadMessage("hello needs num_samples in [1, 2**31) and num_trainable >= 0")
                if not (_count(step) or step == 0):
                    raise BadMessage("hello needs step >= 0")
            except BadMessage as e:
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            if self.secure and peer != cid:
                self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                             f"client certificate is for client {peer}, not {cid}")
            expected = self.proxies[cid].expect.num_samples if self.proxies[cid].expect else None
            if expected is not None and meta["num_samples"] != expected:   # its weight in every average
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"hello: client {cid} claims {meta['num_samples']} training examples; the run's "
                             f"partition gives it {expected}")
        finally:
            self._release(peer)
        proxy = self.proxies[cid]
        if proxy.session is not None:
            proxy.session.close(grpc.StatusCode.ABORTED, "replaced by a new session of the same client")
        proxy.num_samples, proxy.num_trainable = int(meta.get("num_samples", 0)), int(meta.get("num_trainable", 0))
        proxy.hello_step = int(meta.get("step", 0))
        proxy.session = session
        proxy.incarnation += 1
        proxy.frozen = None   # perhaps a new process: the strategy tells it again
        context.add_callback(session.close)
        with self.joined:
            self.joined.notify_all()
        while True:
            item = session.outbox.get()
            if item[0] == "end":
                if item[1] is not None:
                    context.abort(item[1], item[2])
                return
            yield item[1]

    def wait_for_clients(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.joined:
            while not all(p.connected for p in self.proxies):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [p.cid for p in self.proxies if not p.connected]
                    raise TimeoutError(f"clients {missing} did not connect within {timeout_s} s")
                self.joined.wait(left)

    def finish(self) -> None:
        for p in self.proxies:
            if p.connected:
                p.session.outbox.put(("msg", pack("done")))
                p.session.outbox.put(("end", None, ""))


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


def answer(client, kind: str, tensors: dict, meta: dict, precision: str, initial: dict | None = None) -> bytes:
    """Carry out one server command with the client role; the reply message (echoing the command's nonce).
    What the server sends is checked too: a gradient must match the pending activations and every tensor
    must be finite. A step whose values turn non-finite is skipped and reported as an error."""
    try:
        reply_kind, out, reply_meta, wire = _answer(client, kind, tensors, meta, initial)
    except ClientDropped as e:   # a skipped step (BadUpdate), or a command it cannot carry out yet
        reply_kind, out, reply_meta, wire = "error", {}, {"error": str(e)}, "fp32"
    return pack(reply_kind, out, {**reply_meta, "nonce": meta.get("nonce")}, precision if wire == "lossy" else "fp32")


def _answer(client, kind: str, tensors: dict, meta: dict, initial: dict | None):
    """(reply kind, tensors, meta, "lossy" | "fp32") of one command."""
    done = {"compute_s": client.compute_s}
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return "error", {}, {"error": f"{kind}: {name} holds NaN or infinite values"}, "fp32"
    if kind == "backward" and meta.get("no_grad") is True and not tensors:
        if getattr(client, "_activations", None) is None or getattr(client.part, "top", None) is None:
            return "error", {}, {"error": "backward: no gradient, but no pending U-shaped batch"}, "fp32"
    elif kind == "backward":
        pending = getattr(client, "_activations", None)
        grad = tensors.get("activations_grad")
        if pending is None or grad is None or grad.shape != pending.shape:
            return "error", {}, {"error": "backward: the gradient does not match the pending activations"}, "fp32"
    if kind == "top_step":
        pending = getattr(client, "_activations", None)
        x = tensors.get("activations")
        if pending is None or x is None or x.shape != pending.shape or getattr(client.part, "top", None) is None:
            return "error", {}, {"error": "top_step: the activations do not match the pending batch"}, "fp32"
        reply, loss = client.top_step(x)
        return "top", reply, {"loss": loss.smoothed, "ce": loss.ce, "n": int(x.shape[0]),
                              "compute_s": client.compute_s}, "lossy"
    if kind == "forward":
        msg, n = client.forward()
        return "smashed", msg, {"n": n, "compute_s": client.compute_s}, "lossy"
    if kind == "backward":
        client.backward(tensors.get("activations_grad"), int(meta["step"]))
    elif kind == "local_step":
        loss, n = client.local_step(int(meta["step"]))
        return "loss", {}, {"loss": loss.smoothed, "ce": loss.ce, "n": n, "shape": list(client.last_shape),
                            "compute_s": client.compute_s}, "fp32"
    elif kind == "adapter_state":
        return "adapter", client.adapter_state(), done, "fp32"
    elif kind == "peek_adapter_state":   # frozen tensors too: the server evaluates the whole adapter
        return "adapter", client.peek_adapter_state(), done, "fp32"
    elif kind == "set_frozen":
        keys = meta.get("keys")
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            return "error", {}, {"error": "set_frozen: keys must be a list of adapter tensor names"}, "fp32"
        try:
            client.set_frozen(set(keys))
        except KeyError as e:
            return "error", {}, {"error": str(e)}, "fp32"
    elif kind in ("set_layout", "fold"):
        ranks, split = meta.get("ranks"), meta.get("split") if kind == "set_layout" else 1
        if not (isinstance(ranks, dict) and all(_count(r) for r in ranks.values()) and _count(split)):
            return "error", {}, {"error": f"{kind}: needs ranks (module -> rank >= 1) and a split >= 1"}, "fp32"
        try:
            if kind == "set_layout":
                client.set_layout(split, ranks, *parse_layout(tensors))
            else:
                factors, rows = parse_fold(tensors)
                client.fold(factors, ranks, rows)
        except (KeyError, ValueError, RuntimeError) as e:
            return "error", {}, {"error": f"{kind}: {e}"}, "fp32"
    elif kind == "load_adapter_state":
        try:
            client.load_adapter_state(tensors)
        except (KeyError, ValueError) as e:
            return "error", {}, {"error": str(e)}, "fp32"
    elif kind == "state_dict":   # the noise generator's state stays with the client (it would undo the noise)
        out: dict[str, torch.Tensor] = {}
        state = {k: v for k, v in client.state_dict().items() if k != "noise"}
        return "state", out, {"state": split_tensors(state, out)}, "fp32"
    elif kind == "load_state_dict":
        client.load_state_dict(join_tensors(meta["state"], tensors))
    elif kind == "reset" and initial is not None:   # a new run on the server: start over
        client.load_state_dict(initial)
    else:
        return "error", {}, {"error": f"unknown command {kind!r}"}, "fp32"
    return "ack", {}, {"compute_s": client.compute_s}, "fp32"
