"""Committed Omniglot class splits (identical on every machine).

The JSON files in ``meta/data/splits/`` were generated once by ``write_split_files``
(``python -m meta.data.make_splits --data-root /path/to/data``) and are committed. They hold
their own inputs (the sorted character lists of both official sets), so
``make_split_files`` can regenerate them offline; a test checks that it does.

* ``vinyals`` (MAML): all 1,623 ``"Alphabet/characterNN"`` names sorted, shuffled with
  ``random.Random(1)`` (a local instance, not the global RNG), first 1,100 train, next
  100 val, remaining 423 test; i.e. 1,200 meta-training characters "irrespective of
  alphabet" like the MAML code (which shuffles ``os.listdir`` order with seed 1, which is
  not reproducible across machines, hence the sorted list here).
* ``lake``: background set (964 characters, 30 alphabets) for train and the evaluation
  set (659 characters, 20 alphabets) for test; validation is 5 whole background alphabets
  chosen with ``random.Random(1)`` from the sorted alphabet list (alphabet-disjoint, like
  the background/evaluation boundary), and train is the remaining 25 alphabets.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPLIT_DIR = Path(__file__).resolve().parent / "splits"
SPLIT_NAMES = ("train", "val", "test")
PROTOCOLS = ("vinyals", "lake")
SEED = 1
VINYALS_TRAIN, VINYALS_VAL = 1100, 100
LAKE_VAL_ALPHABETS = 5


def make_vinyals_split(
    characters: Sequence[str], seed: int = SEED, num_train: int = VINYALS_TRAIN,
    num_val: int = VINYALS_VAL,
) -> dict[str, list[str]]:
    """Shuffle the sorted character names with ``random.Random(seed)``; split train/val/test."""
    order = sorted(characters)
    if num_train + num_val >= len(order):
        raise ValueError(f"{num_train}+{num_val} train/val characters leave no test set of "
                         f"{len(order)} characters")
    random.Random(seed).shuffle(order)
    return {
        "train": sorted(order[:num_train]),
        "val": sorted(order[num_train:num_train + num_val]),
        "test": sorted(order[num_train + num_val:]),
    }


def make_lake_split(
    background: Sequence[str], evaluation: Sequence[str], seed: int = SEED,
    num_val_alphabets: int = LAKE_VAL_ALPHABETS,
) -> dict[str, list[str]]:
    """Background -> train (minus ``num_val_alphabets`` whole alphabets -> val);
    evaluation -> test."""
    alphabets = sorted({name.split("/")[0] for name in background})
    if num_val_alphabets >= len(alphabets):
        raise ValueError(f"cannot hold out {num_val_alphabets} of {len(alphabets)} alphabets")
    random.Random(seed).shuffle(alphabets)
    val_alphabets = set(alphabets[:num_val_alphabets])
    return {
        "train": sorted(n for n in background if n.split("/")[0] not in val_alphabets),
        "val": sorted(n for n in background if n.split("/")[0] in val_alphabets),
        "test": sorted(evaluation),
    }


def make_split_files(
    background: Sequence[str], evaluation: Sequence[str], **sizes: int
) -> dict[str, dict[str, Any]]:
    """Content of both split files, keyed by protocol. ``sizes`` may override
    ``num_train``/``num_val`` (vinyals) and ``num_val_alphabets`` (lake) for small fixtures."""
    background, evaluation = sorted(background), sorted(evaluation)
    common = {"seed": SEED, "background": background, "evaluation": evaluation}
    vinyals = make_vinyals_split(
        background + evaluation, SEED, sizes.get("num_train", VINYALS_TRAIN),
        sizes.get("num_val", VINYALS_VAL),
    )
    lake = make_lake_split(
        background, evaluation, SEED, sizes.get("num_val_alphabets", LAKE_VAL_ALPHABETS)
    )
    return {
        "vinyals": {
            "protocol": "vinyals",
            "description": "sorted background+evaluation names, random.Random(seed).shuffle, "
                           "first num_train train, next num_val val, rest test",
            **common, **vinyals,
        },
        "lake": {
            "protocol": "lake",
            "description": "background -> train except num_val_alphabets whole alphabets "
                           "(random.Random(seed).shuffle of sorted alphabets) -> val; "
                           "evaluation -> test",
            **common, **lake,
        },
    }


def split_to_json(content: dict[str, Any]) -> str:
    """Canonical JSON text of a split file (one name per line, trailing newline)."""
    return json.dumps(content, indent=1, sort_keys=True) + "\n"


def split_path(protocol: str) -> Path:
    """Path of the committed split file of ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown Omniglot protocol {protocol!r}; expected one of {PROTOCOLS}")
    return SPLIT_DIR / f"omniglot_{protocol}.json"


def load_split(protocol: str) -> dict[str, Any]:
    """The committed split of ``protocol`` ("vinyals" or "lake")."""
    return json.loads(split_path(protocol).read_text())


def write_split_files(data_root: str | Path | None = None, out_dir: Path = SPLIT_DIR) -> list[Path]:
    """Regenerate the split files from the character names found in the data."""
    from meta.data.omniglot import list_omniglot_characters
    from meta.data.paths import resolve_data_root

    sets = list_omniglot_characters(resolve_data_root(data_root) / "omniglot")
    out = []
    for protocol, content in make_split_files(sets["background"], sets["evaluation"]).items():
        path = Path(out_dir) / f"omniglot_{protocol}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(split_to_json(content))
        out.append(path)
    return out

