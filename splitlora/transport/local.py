"""The simulator's transport: `Link` really serializes every message and parses it back (so byte counts
are those of the serialized tensors and the receiver never shares memory with the sender), and
`LinkedClient` puts a client role behind it with the methods of the client contract. `Traffic` counts
bytes per client and kind: the simulator's link and the gRPC server keep the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..contract import COMMANDS
from .codec import decode, encode, fold_message, layout_message, parse_fold, parse_layout


@dataclass(kw_only=True)
class Traffic:
    """Bytes sent down (server -> client) and up, in total and per client; `log` keeps (client, kind,
    bytes) of each message since the last `take_log()`, for the cost model."""

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


@dataclass
class Link(Traffic):
    """`up` is client -> server, `down` is server -> client: each message encoded at the wire `precision`
    and decoded again, its bytes counted under `kind`."""

    precision: str = "fp32"

    def up(self, tensors: dict[str, torch.Tensor], cid: int = -1, kind: str = "up") -> dict[str, torch.Tensor]:
        data = encode(tensors, self.precision)
        self.add(cid, up=len(data), kind=kind)
        return decode(data)

    def down(self, tensors: dict[str, torch.Tensor], cid: int = -1, kind: str = "down") -> dict[str, torch.Tensor]:
        data = encode(tensors, self.precision)
        self.add(cid, down=len(data), kind=kind)
        return decode(data)


class LinkedClient:
    """A client role reached through a Link: what a strategy talks to in the simulator."""

    def __init__(self, client, link: Link):
        self.client, self.link = client, link
        self.cid = client.cid

    num_samples = property(lambda self: self.client.num_samples)
    num_trainable = property(lambda self: self.client.num_trainable)
    compute_s = property(lambda self: self.client.compute_s)

    last_shape = property(lambda self: self.client.last_shape)
    frozen = property(lambda self: set(self.client.frozen))

    def forward(self) -> tuple[dict[str, torch.Tensor], int]:
        msg, n = self.client.forward()
        return self.link.up(msg, self.cid, COMMANDS["forward"].up), n

    def backward(self, activations_grad: torch.Tensor | None, global_step: int) -> None:
        """The activation gradient down (None: nothing is sent, the client only steps its top)."""
        if activations_grad is not None:
            activations_grad = self.link.down({"activations_grad": activations_grad}, self.cid, COMMANDS["backward"].down)["activations_grad"]
        self.client.backward(activations_grad, global_step)

    def local_step(self, global_step: int):
        return self.client.local_step(global_step)

    def top_step(self, server_out: dict[str, torch.Tensor]):
        """U-shape: the server's output down, the gradient of it up."""
        down = self.link.down(server_out, self.cid, COMMANDS["top_step"].down)
        reply, loss = self.client.top_step(down["activations"])
        return self.link.up(reply, self.cid, COMMANDS["top_step"].up), loss

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self.link.up(self.client.adapter_state(), self.cid, COMMANDS["adapter_state"].up)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.client.load_adapter_state(self.link.down(state, self.cid, COMMANDS["load_adapter_state"].down))

    def set_frozen(self, keys) -> None:
        """Freeze these adapter tensors on the client (DLoRA's killed modules): a command, no tensors."""
        self.client.set_frozen(set(keys))

    def set_layout(self, split: int, ranks: dict[str, int], adapter: dict[str, torch.Tensor],
                   base: dict[str, torch.Tensor]) -> None:
        """A heterogeneous client's part, ranks, starting adapter and base weights, down."""
        down = self.link.down(layout_message(adapter, base), self.cid, COMMANDS["set_layout"].down)
        self.client.set_layout(split, ranks, *parse_layout(down))

    def fold(self, factors, ranks: dict[str, int], rows: dict[str, torch.Tensor], mode: str,
             adapter: dict | None = None) -> None:
        """A heterogeneous aggregation, down: the stacked factors of the client's modules, its new ranks and
        rows, and (stack_svd) its new adapter."""
        down = self.link.down(fold_message(factors, rows, adapter), self.cid, COMMANDS["fold"].down)
        factors, rows, adapter = parse_fold(down)
        self.client.fold(factors, ranks, rows, mode, adapter)

    def peek_adapter_state(self) -> dict[str, torch.Tensor]:
        """The whole adapter (frozen tensors too) for evaluation: a measurement, so nothing is counted."""
        return self.client.peek_adapter_state()

    def state_dict(self) -> dict:
        return self.client.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.client.load_state_dict(state)
