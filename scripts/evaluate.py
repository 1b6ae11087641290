"""Evaluate a saved run on its fixed test tasks: ``python scripts/evaluate.py CHECKPOINT_OR_RUN_FOLDER [key=value]``.

    python scripts/evaluate.py runs/omniglot_5w1s_quick-seed0/best.pt
    python scripts/evaluate.py runs/x eval.checkpoint=ensemble eval.ensemble_size=3
    python scripts/evaluate.py --help                              # the keys that apply to a saved run

The command line of meta.evaluate (meta/training/run.py), the same as the console command meta-evaluate.
"""

import sys

from meta.cli import evaluate

if __name__ == "__main__":
    sys.exit(evaluate(sys.argv[1:], prog="python scripts/evaluate.py"))
