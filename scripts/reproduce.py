"""Reproduce a paper table: ``python scripts/reproduce.py TABLE [--seeds N] [--minutes M | --iterations N] ...``.

    python scripts/reproduce.py maml_omniglot                          # experiments/tables/maml_omniglot.yaml
    python scripts/reproduce.py maml_omniglot --seeds 3 --minutes 30   # about 30 minutes of training per run
    python scripts/reproduce.py --help                                 # every option

The command line of the table runner (meta/training/reproduce.py), the same as the console command
meta-reproduce: each run is a process of scripts/train_maml.py; the table goes next to the paper's.
"""

import sys

from meta.cli import reproduce

if __name__ == "__main__":
    sys.exit(reproduce(sys.argv[1:], prog="python scripts/reproduce.py"))
