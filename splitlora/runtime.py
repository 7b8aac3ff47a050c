"""Where and in what precision a role computes, decided in one place from the config's `runtime` section.

Each role (the main server, each client) has a `Runtime`: its device, the dtype of its frozen base
weights, its autocast dtype (mixed precision) and whether its part recomputes blocks in backward. LoRA
weights, their gradients and AdamW moments stay fp32 whatever the base dtype (PEFT keeps adapters in
fp32); batches, masks, messages and random generators live on the role's device; what crosses the
split is moved by the receiver.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass

import torch

from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str, field: str = "runtime.device") -> torch.device:
    """`auto`: CUDA if available, else MPS, else the CPU; otherwise the named device, which must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{field}: {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}: {name} asked for, but this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{field}: {name} asked for, but this machine has {torch.cuda.device_count()} GPUs")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(f"{field}: mps asked for, but it is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{field}: {name!r} is not a device splitlora runs on (cpu, cuda, mps)")
    return device


@dataclass(frozen=True)
class Runtime:
    """One role's device and precision."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32            # frozen base weights
    autocast: torch.dtype | None = None            # mixed-precision compute
    checkpointing: bool = False                    # recompute each block in backward
    quantization: str = "none"                     # none, int8, nf4 (the frozen base weights)

    def compute(self):
        """The context a role's forward runs in: autocast to its dtype, or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA runs asynchronously; timings must wait for it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self, t0: float) -> float:
        """Seconds of this role's compute since `t0` (time.perf_counter()), its queued device work included."""
        self.synchronize()
        return time.perf_counter() - t0

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "autocast": None if self.autocast is None else str(self.autocast).removeprefix("torch."),
                "gradient_checkpointing": self.checkpointing, "quantization": self.quantization}


def role_seed(seed: int, role: str, cid: int = 0) -> int:
    """A seed of its own for each role of a run: (run seed, role, client id) hashed to 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{role}:{cid}".encode()).digest()[:8], "little") >> 1


class RandomStream:
    """A role's own stream of the global random numbers its modules draw (LoRA dropout), swapped in while
    the role computes. Without it the roles of a simulation share one stream and draw in turn, while a
    deployed role draws alone: the same run gave other dropout masks in the two. With it a role draws
    the same numbers wherever it runs, so a deployment equals the simulator with dropout too."""

    def __init__(self, seed: int, device: torch.device = torch.device("cpu")):
        self.device = device
        self.state = torch.Generator(device=device).manual_seed(seed).get_state()

    def _swap(self, state: torch.Tensor) -> torch.Tensor:
        """Install `state` as the device's global generator state; return the one it replaces."""
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            old = torch.cuda.get_rng_state(index)
            torch.cuda.set_rng_state(state, index)
        elif self.device.type == "mps":
            old = torch.mps.get_rng_state()
            torch.mps.set_rng_state(state)
        else:
            old = torch.get_rng_state()
            torch.set_rng_state(state)
        return old

    @contextlib.contextmanager
    def active(self):
        outer = self._swap(self.state)
        try:
            yield
        finally:
            self.state = self._swap(outer)


def runtime_of(cfg, role: str, cid: int | None = None) -> Runtime:
    """The runtime of `role` ('server' or 'client' with its id) under config `cfg`."""
    r = cfg.runtime
    if role == "server":
        name, field = r.server_device or r.device, "runtime.server_device" if r.server_device else "runtime.device"
    else:
        devices = r.client_devices
        if isinstance(devices, list):
            name, field = devices[cid or 0], f"runtime.client_devices[{cid or 0}]"
        else:
            name, field = devices or r.device, "runtime.client_devices" if devices else "runtime.device"
    quantized = cfg.model.quantization != "none" and cfg.model.quantize in ("both", role)
    return Runtime(resolve_device(name, field), DTYPES[r.dtype],
                   None if r.autocast == "none" else DTYPES[r.autocast], r.gradient_checkpointing,
                   cfg.model.quantization if quantized else "none")
