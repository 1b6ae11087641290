"""Regenerate the committed Omniglot split files: ``python -m meta.data.make_splits``.

``--check-protonets DIR`` also compares the ``protonets_vinyals`` files with ProtoNets' own split files
(jakesnell/prototypical-networks ``data/omniglot/splits/vinyals/{train,val,test,trainval}.txt``, whose lines name
``Alphabet/characterNN/rotDDD``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meta.data.omniglot import list_omniglot_characters
from meta.data.paths import resolve_data_root
from meta.data.splits import SPLIT_DIR, make_split_files, split_to_json


def write_split_files(data_root: str | Path | None = None, out_dir: Path = SPLIT_DIR) -> list[Path]:
    """Regenerate the split files from the character names found in the data."""
    sets = list_omniglot_characters(resolve_data_root(data_root) / "omniglot")
    out = []
    for protocol, content in make_split_files(sets["background"], sets["evaluation"]).items():
        path = Path(out_dir) / f"omniglot_{protocol}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(split_to_json(content))
        out.append(path)
    return out


def check_protonets_files(split_dir: Path, out_dir: Path = SPLIT_DIR) -> list[str]:
    """Differences between our protonets_vinyals(_trainval) files and ProtoNets' txt files (empty: identical)."""
    import json

    problems = []
    for protocol, files in (("protonets_vinyals", {"train": "train", "val": "val", "test": "test"}),
                            ("protonets_vinyals_trainval", {"train": "trainval"})):
        ours = json.loads((Path(out_dir) / f"omniglot_{protocol}.json").read_text())
        for split, stem in files.items():
            lines = (Path(split_dir) / f"{stem}.txt").read_text().split()
            theirs = sorted({line.rsplit("/", 1)[0] for line in lines})
            if theirs != ours[split]:
                problems.append(f"{protocol} {split}: {len(ours[split])} characters here, {len(theirs)} in {stem}.txt")
    return problems


def main(argv: list[str] | None = None) -> None:
    """Write ``omniglot_<protocol>.json`` for every protocol from the data's names."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=None, help="folder containing omniglot/")
    parser.add_argument("--out-dir", default=str(SPLIT_DIR))
    parser.add_argument("--check-protonets", default=None, help="folder with ProtoNets' vinyals/*.txt")
    args = parser.parse_args(argv)
    for path in write_split_files(args.data_root, Path(args.out_dir)):
        print(path)
    if args.check_protonets:
        problems = check_protonets_files(Path(args.check_protonets), Path(args.out_dir))
        print("\n".join(problems) if problems else "protonets_vinyals matches ProtoNets' split files")
        if problems:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
