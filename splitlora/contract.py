"""The client contract: everything a strategy may ask of a client, declared once for both transports.

`ClientHandle` is the interface (the client role's methods as a strategy sees them); `LinkedClient`
(the simulator, `transport.local`) and `RemoteClient` (gRPC, `transport.server`) implement it, and a
deployed client process answers each command with the same `roles.Client` method (`transport.client`).
`COMMANDS` is the message table: for each command the kind of its reply, how the cost model counts
the bytes each way, and whether its activations may travel at the lossy wire precision. The
in-process link, the gRPC server and client, and the cost model all read it; the replies' validators
(`transport.checks.REPLY_CHECKS`) are keyed by its reply kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Command:
    name: str                 # the client method, and the message kind of the request
    reply: str = "ack"        # the message kind of the reply
    down: str | None = None   # the cost model's kind of the request's bytes (None: a command, not data)
    up: str | None = None     # the cost model's kind of the reply's bytes (None: an acknowledgement)
    lossy: bool = False       # the request's activations travel at the wire precision
    lossy_reply: bool = False  # the reply's activations travel at the wire precision
    ledger: str = "run"       # where its bytes count: the run's traffic, "checkpoint" reads and restores
                              # (the deployment's fault tolerance; reported apart) or "measurement" (not counted)


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("forward", "smashed", up="smashed", lossy_reply=True),
    Command("backward", down="grad", lossy=True),
    Command("top_step", "top", down="server_activations", up="top_grad", lossy=True, lossy_reply=True),
    Command("local_step", "loss"),
    Command("adapter_state", "adapter", up="adapter_up"),
    Command("peek_adapter_state", "adapter", ledger="measurement"),
    Command("load_adapter_state", down="adapter_down"),
    Command("set_frozen"),                                   # DLoRA: kill and revive modules
    Command("set_layout", down="layout"),                    # heterogeneous: split, ranks, adapter, base
    Command("fold", down="adapter_down"),                    # heterogeneous: factors into the base, new adapter
    Command("state_dict", "state", ledger="checkpoint"),
    Command("load_state_dict", ledger="checkpoint"),
    Command("reset"),                                        # a new run: back to the initial state
)}

# how a heterogeneous client's adapter is refitted at a fold (`roles.refit_adapter`; hsplit.aggregation)
FOLD_MODES = ("restart", "keep", "replace")

# what the cost model prices per kind: bytes a client sends (up) and receives (down); "data" is cenlora's upload
UP_KINDS = tuple(dict.fromkeys([c.up for c in COMMANDS.values() if c.up] + ["data"]))
DOWN_KINDS = tuple(dict.fromkeys(c.down for c in COMMANDS.values() if c.down))


@runtime_checkable
class ClientHandle(Protocol):
    """A client as a strategy reaches it. Methods raise `learning.ClientDropped` when the client is gone or
    what it sent is refused; the strategy then goes on without it for the round."""

    cid: int
    num_samples: int
    num_trainable: int
    compute_s: float
    last_shape: tuple[int, int]
    frozen: set | None

    def forward(self) -> tuple[dict, int]: ...
    def backward(self, activations_grad, global_step: int) -> None: ...
    def top_step(self, server_out: dict) -> tuple[dict, object]: ...
    def local_step(self, global_step: int) -> tuple[object, int]: ...
    def adapter_state(self) -> dict: ...
    def peek_adapter_state(self) -> dict: ...
    def load_adapter_state(self, state: dict) -> None: ...
    def set_frozen(self, keys) -> None: ...
    def set_layout(self, split: int, ranks: dict, adapter: dict, base: dict) -> None: ...
    def fold(self, factors: dict, ranks: dict, rows: dict, mode: str, adapter: dict | None = None) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
