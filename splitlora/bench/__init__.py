"""Benchmarks that write JSON (CLI `splitlora bench NAME`): `overhead` (split vs plain PEFT step),
`deploy` (a deployment vs the simulator), `hetero` (heterogeneous clients, Kill & Revive), `noise` (the
defense's cost), `precision` (fp32 vs bf16), `memory` (peak memory of a part, large shapes) and `scale`
(one server, up to 16 client processes)."""

from .deploy import deploy
from .hetero import hetero
from .memory import memory
from .noise import noise, noisy_validation_loss
from .overhead import overhead
from .precision import precision
from .scale import scale

__all__ = ["deploy", "hetero", "memory", "noise", "noisy_validation_loss", "overhead", "precision", "scale"]
