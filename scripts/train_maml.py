"""Train and evaluate a meta-learner: ``python scripts/train_maml.py [key=value ...]``.

    python scripts/train_maml.py                                   # the default: Omniglot 5w1s, short CPU run
    python scripts/train_maml.py preset=maml_omniglot_5w1s seed=1  # a paper preset
    python scripts/train_maml.py --help                            # every key and preset

The command line of meta.train (meta/training/run.py), the same as the console command meta-train: it reads the
arguments, builds the config, runs (or sweeps) and exits with 0 or a one-line error (meta/cli.py).
"""

import sys

from meta.cli import train

if __name__ == "__main__":
    sys.exit(train(sys.argv[1:], prog="python scripts/train_maml.py", command=" ".join(["python", *sys.argv])))
