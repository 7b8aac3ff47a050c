"""The server side of a deployment: one gRPC stream per client (its session), authenticated and bounded
by the `Hub`, and `RemoteClient`, the server's handle on a client: the client contract's methods, each
a command of the message table sent down the session, its reply checked (`checks`) before the strategy
sees it. A bad reply ends that session with INVALID_ARGUMENT; the client drops out of the round.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections import Counter

import grpc
import torch

from ..checkpoint import split_tensors
from ..contract import COMMANDS
from ..learning import ClientDropped, Loss
from .checks import REPLY_CHECKS, Expectations, count_of, check_compute
from .codec import BadMessage, fold_message, layout_message, pack, unpack
from .limits import HELLO_HEADER
from .local import Traffic


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

    def _call(self, kind: str, tensors=None, meta=None):
        """Carry out one command of the message table (`contract.COMMANDS`) and return (the checked reply's
        value, its metadata); the bytes each way are counted under the table's kinds."""
        cmd = COMMANDS[kind]
        session = self.session
        if session is None or session.closed.is_set():
            raise ClientDropped(f"client {self.cid}: not connected")
        nonce = secrets.randbits(62)   # the reply must echo it: a stale or replayed reply cannot
        data = pack(kind, tensors, {**(meta or {}), "nonce": nonce}, self.hub.precision if cmd.lossy else "fp32")
        stats = {"run": self.hub.stats, "checkpoint": self.hub.checkpoint_stats}.get(cmd.ledger, Traffic())
        stats.add(self.cid, down=len(data), kind=cmd.down or "command")
        sent = time.monotonic()
        session.outbox.put(("msg", data))
        try:
            answer = session.inbox.get(timeout=self.hub.timeout_s)
        except queue.Empty:
            session.close(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply to {kind} in {self.hub.timeout_s} s")
            raise ClientDropped(f"client {self.cid}: missed the {self.hub.timeout_s} s deadline for {kind}") from None
        if answer is None:
            raise ClientDropped(f"client {self.cid}: disconnected")
        stats.add(self.cid, up=len(answer), kind=cmd.up or "reply")
        try:
            got, out, rmeta = unpack(answer, self.expect.max_bytes, self.expect.max_header)
            if got == "error" and isinstance(rmeta.get("error"), str):
                raise BadMessage(f"it could not carry out {kind}: {rmeta['error'][:300]}")
            if got != cmd.reply:
                raise BadMessage(f"expected a {cmd.reply!r} reply to {kind}, got {got!r}")
            frozen = set() if kind == "peek_adapter_state" else self.frozen or set()
            out = REPLY_CHECKS[cmd.reply](out, rmeta, tensors or {}, self.expect, frozen)
            if rmeta.get("nonce") != nonce:   # checked last, so a malformed reply is refused for what is wrong
                raise BadMessage(f"the reply to {kind} answers another command (stale or replayed)")
            check_compute(rmeta, self.compute_s, time.monotonic() - sent)
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
        out, meta = self._call("forward")
        return out, int(meta["n"])

    def backward(self, activations_grad: torch.Tensor | None, global_step: int) -> None:
        """None: no gradient is sent; the client only steps its top (DLoRA killed its whole bottom)."""
        if activations_grad is None:
            self._call("backward", meta={"step": global_step, "no_grad": True})
        else:
            self._call("backward", {"activations_grad": activations_grad}, {"step": global_step})

    def top_step(self, server_out: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Loss]:
        out, meta = self._call("top_step", server_out)
        return out, Loss(float(meta["loss"]), float(meta["ce"]))

    def local_step(self, global_step: int) -> tuple[Loss, int]:
        _, meta = self._call("local_step", meta={"step": global_step})
        self.last_shape = tuple(meta["shape"])
        return Loss(float(meta["loss"]), float(meta["ce"])), int(meta["n"])

    def adapter_state(self):
        return self._call("adapter_state")[0]

    def peek_adapter_state(self):
        return self._call("peek_adapter_state")[0]

    def set_frozen(self, keys) -> None:
        self._call("set_frozen", meta={"keys": sorted(keys)})
        self.frozen = set(keys)

    def set_layout(self, split: int, ranks: dict[str, int], adapter: dict, base: dict) -> None:
        self._call("set_layout", layout_message(adapter, base), {"split": split, "ranks": ranks})
        self.frozen = set()
        self.expect.adapter_shapes = {k: tuple(v.shape) for k, v in adapter.items()}   # what it sends from now

    def fold(self, factors, ranks: dict[str, int], rows: dict, mode: str, adapter: dict | None = None) -> None:
        self._call("fold", fold_message(factors, rows, adapter), {"ranks": ranks, "mode": mode})
        shapes = self.expect.adapter_shapes
        for k, s in shapes.items():
            r = ranks[k.rsplit(".lora_", 1)[0]]
            shapes[k] = (r, s[1]) if ".lora_A." in k else (s[0], r)

    def load_adapter_state(self, state) -> None:
        self._call("load_adapter_state", state)

    def state_dict(self) -> dict:
        return self._call("state_dict")[0]

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
        self.stats = Traffic()              # the run's traffic (the strategy's link: metrics, cost model)
        self.checkpoint_stats = Traffic()   # client states read for checkpoints and restored (this process)
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

    def _hello(self, first, peer, context) -> tuple[int, dict]:
        """(client id, hello metadata) of a session's first message, or the session is refused (abort)."""
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
            if not count_of(meta.get("num_samples")) or not (count_of(trainable) or trainable == 0):
                raise BadMessage("hello needs num_samples in [1, 2**31) and num_trainable >= 0")
            if not (count_of(step) or step == 0):
                raise BadMessage("hello needs step >= 0")
        except BadMessage as e:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.secure and peer != cid:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"client certificate is for client {peer}, not {cid}")
        expected = self.proxies[cid].expect.num_samples if self.proxies[cid].expect else None
        if expected is not None and meta["num_samples"] != expected:   # its weight in every average
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"hello: client {cid} claims {meta['num_samples']} training examples; the run's "
                         f"partition gives it {expected}")
        return cid, meta

    def _join(self, cid: int, meta: dict, session: "Session") -> None:
        """The session becomes client cid's (an older one is closed): perhaps a new process, so the
        strategy tells it again what it must hold."""
        proxy = self.proxies[cid]
        if proxy.session is not None:
            proxy.session.close(grpc.StatusCode.ABORTED, "replaced by a new session of the same client")
        proxy.num_samples, proxy.num_trainable = int(meta.get("num_samples", 0)), int(meta.get("num_trainable", 0))
        proxy.hello_step = int(meta.get("step", 0))
        proxy.session = session
        proxy.incarnation += 1
        proxy.frozen = None
        with self.joined:
            self.joined.notify_all()

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
            cid, meta = self._hello(first, peer, context)
        finally:
            self._release(peer)
        context.add_callback(session.close)
        self._join(cid, meta, session)
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
