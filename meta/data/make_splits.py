"""Regenerate the committed Omniglot split files: ``python -m meta.data.make_splits``."""

from __future__ import annotations

import argparse
from pathlib import Path

from meta.data.splits import SPLIT_DIR, write_split_files


def main(argv: list[str] | None = None) -> None:
    """Write ``omniglot_vinyals.json`` and ``omniglot_lake.json`` from the data's names."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=None, help="folder containing omniglot/")
    parser.add_argument("--out-dir", default=str(SPLIT_DIR))
    args = parser.parse_args(argv)
    for path in write_split_files(args.data_root, Path(args.out_dir)):
        print(path)


if __name__ == "__main__":
    main()
