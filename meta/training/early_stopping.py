"""Early stopping on the validation loss (``train.early_stop_patience``), as a record kept in checkpoints."""

from __future__ import annotations

import math
from typing import Any


def early_stop_start() -> dict[str, Any]:
    """The early-stopping record before the first validation (kept in checkpoints, so a resumed run goes on)."""
    return {"best_loss": math.inf, "best_step": 0, "wait": 0, "stopped": False}


def early_stop_update(record: dict[str, Any], val_loss: float, step: int, patience: int) -> dict[str, Any]:
    """The record after a validation at ``step`` with loss ``val_loss`` (``train.early_stop_patience``).

    jakesnell/prototypical-networks scripts/train/few_shot/train.py L98-114, once per validation (an epoch there):
    a loss below the best so far (strictly; a NaN never is) becomes the best and resets the wait; otherwise the
    wait grows, and training stops once it exceeds ``patience`` (``wait > patience``, L112), that is after
    ``patience + 1`` validations in a row without improvement."""
    if val_loss < record["best_loss"]:
        return {**record, "best_loss": float(val_loss), "best_step": step, "wait": 0}
    wait = record["wait"] + 1
    return {**record, "wait": wait, "stopped": wait > patience}
