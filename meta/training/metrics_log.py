"""The metrics log: ``metrics.jsonl`` (strict JSON lines), and TensorBoard with ``log.tensorboard=true``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from meta.training.checkpoints import CheckpointError
from meta.training.config import ConfigError
from meta.training.run_folder import TENSORBOARD_DIR, atomic_write_text


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON (``allow_nan=False``): non-finite numbers become ``null``."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step.

    With ``tensorboard=True`` every record's numbers also go to TensorBoard (``<split>/<name>`` at the record's
    step, in ``TENSORBOARD_DIR`` beside the log), and so does ``learning_rate`` when :meth:`append` is given one.
    """

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        self.tensorboard = tensorboard
        self._writer: Any = None
        self._purge_step: int | None = None
        if tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard (or "
                                  "pip install 'meta-vmap[tensorboard]'), or leave log.tensorboard=false") from None

    def append(self, record: dict[str, Any], learning_rate: float | None = None) -> None:
        """Write one record and flush it to disk (and to TensorBoard, with the learning rate, when enabled)."""
        with self.path.open("a") as f:
            f.write(to_json(record) + "\n")
        if self.tensorboard:
            scalars = {name: value for name, value in record.items() if name not in ("step", "split")
                       and isinstance(value, int | float) and not isinstance(value, bool)}
            if learning_rate is not None:
                scalars["learning_rate"] = float(learning_rate)
            writer = self._tensorboard_writer()
            for name, value in scalars.items():
                writer.add_scalar(f"{record['split']}/{name}", value, record["step"])
            writer.flush()

    def _tensorboard_writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events logged after its checkpoint, as truncate_after drops the records
            self._writer = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR), purge_step=self._purge_step)
        return self._writer

    def close(self) -> None:
        """Close the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def read(self) -> list[dict[str, Any]]:
        """All complete records so far (a half-written last line, left by a kill, is not one)."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        complete = text[: text.rfind("\n") + 1]
        records = []
        for number, line in enumerate(complete.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise CheckpointError(f"{self.path} line {number} is not JSON; the metrics log is damaged "
                                          f"(delete the line, or restart the run with overwrite=true)") from None
        return records

    def truncate_after(self, step: int) -> None:
        """Keep the complete records up to ``step`` (later ones were written after the checkpoint a run resumes
        from; a half-written last line is dropped)."""
        kept = [r for r in self.read() if r["step"] <= step]
        self._purge_step = step + 1
        atomic_write_text(self.path, "".join(to_json(r) + "\n" for r in kept))
