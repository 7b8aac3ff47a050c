"""What crosses the client/server boundary, as bytes: safetensors on disk and on the wire, never pickle.

`Link` is the in-process transport of the simulator: every message is really serialized and parsed
back, so the byte counts are those of the serialized tensors and the receiver never shares memory
with the sender. The networked transport sends the very same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous() for k, v in tensors.items()})


def decode(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


def smashed_message(activations: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Client -> server: activations at the split point, the 2-D mask (bool) and the labels (int32)."""
    msg = {"activations": activations, "attention_mask": attention_mask.to(torch.bool)}
    if labels is not None:
        msg["labels"] = labels.to(torch.int32)
    return msg


@dataclass
class Link:
    """Counts bytes each way; `up` is client -> server, `down` is server -> client."""

    bytes_up: int = 0
    bytes_down: int = 0

    def up(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        data = encode(tensors)
        self.bytes_up += len(data)
        return decode(data)

    def down(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        data = encode(tensors)
        self.bytes_down += len(data)
        return decode(data)

    def state_dict(self) -> dict:
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_up, self.bytes_down = state["bytes_up"], state["bytes_down"]
