"""TensorBoard: a run's metrics.jsonl scalars (losses, bytes, simulated time, per-role compute, alive
adapters, live clients, ...) written to RUN_DIR/tb/ through torch.utils.tensorboard as they are recorded.
`tensorboard --logdir RUN_DIR/tb` shows one run; `--logdir COMPARE_DIR` overlays a comparison's runs."""

from __future__ import annotations

from pathlib import Path


class Board:
    def __init__(self, directory: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops what an interrupted one wrote past its checkpoint
        self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()
