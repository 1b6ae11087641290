"""Tests on the real Omniglot and MNIST files under $META_DATA_ROOT (skipped without them).

Run locally with ``META_DATA_ROOT=/work/shared/data``; the Omniglot preprocessing (32,460
PNGs) happens once per session into a temporary cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from meta.data import TaskSampler, evaluation_tasks, load_mnist, load_omniglot, load_split
from meta.data.cache import source_fingerprint
from meta.data.omniglot import list_omniglot_characters, load_omniglot_characters

pytestmark = pytest.mark.slow

ROOT = os.environ.get("META_DATA_ROOT", "")
OMNIGLOT = Path(ROOT) / "omniglot"
MNIST_RAW = Path(ROOT) / "MNIST" / "raw"
HAS_OMNIGLOT = bool(ROOT) and all(
    (OMNIGLOT / f"{s}.zip").is_file() or (OMNIGLOT / s).is_dir()
    for s in ("images_background", "images_evaluation")
)
HAS_MNIST = bool(ROOT) and (MNIST_RAW / "t10k-images-idx3-ubyte").is_file()
needs_omniglot = pytest.mark.skipif(
    not HAS_OMNIGLOT,
    reason="META_DATA_ROOT is unset or has no omniglot/images_{background,evaluation}(.zip)",
)
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST, reason="META_DATA_ROOT is unset or has no MNIST/raw/*-ubyte files"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("meta-cache")


@pytest.fixture(scope="module")
def characters(cache_dir: Path) -> dict:
    if not HAS_OMNIGLOT:
        pytest.skip("no Omniglot under META_DATA_ROOT")
    data, rebuilt = load_omniglot_characters(ROOT, cache_dir=cache_dir)
    assert rebuilt
    return data


@needs_omniglot
def test_omniglot_content(characters: dict, cache_dir: Path) -> None:
    names, images = characters["names"], characters["images"]
    assert len({n.split("/")[0] for n in names}) == 50
    assert len(names) == 1623 and images.shape == (1623, 20, 28, 28) and images.dtype == torch.uint8
    assert characters["sets"].count("background") == 964
    # strokes bright on a dark background
    assert float(images.float().mean()) < 40 and int(images.max()) == 255
    assert (images.flatten(2).amax(-1) > 0).all()  # no blank drawing
    # names match the inputs stored in the committed split files
    stored = load_split("maml_random")
    assert names == sorted(stored["background"] + stored["evaluation"])
    assert list_omniglot_characters(OMNIGLOT) == {
        "background": stored["background"], "evaluation": stored["evaluation"]}
    # cached: a second load does not rebuild, and nothing is written to the data root
    before = source_fingerprint(OMNIGLOT)
    again, rebuilt = load_omniglot_characters(ROOT, cache_dir=cache_dir)
    assert not rebuilt and torch.equal(again["images"], images)
    assert source_fingerprint(OMNIGLOT) == before


SPLIT_SIZES = [
    ("maml_random", (1100, 100, 423)), ("protonets_vinyals", (1028, 172, 423)),
    ("protonets_vinyals_trainval", (1200, 172, 423)), ("reptile", (1200, 1200, 423)), ("imaml", (1200, 1200, 423)),
    ("mamlpp", (1150, 50, 423)), ("lake", (804, 160, 659)),
]


@needs_omniglot
@pytest.mark.parametrize(("protocol", "sizes"), SPLIT_SIZES)
def test_omniglot_splits(characters: dict, cache_dir: Path, protocol: str, sizes: tuple) -> None:
    pools = {s: load_omniglot(ROOT, s, protocol=protocol, cache_dir=cache_dir)
             for s in ("train", "val", "test")}
    assert [p.num_classes for p in pools.values()] == [4 * n for n in sizes]
    base = {s: {n.split("@")[0] for n in p.names} for s, p in pools.items()}
    assert [len(b) for b in base.values()] == list(sizes)
    assert not (base["train"] & base["test"] or base["val"] & base["test"])
    assert (base["val"] <= base["train"]) if protocol in ("reptile", "imaml", "protonets_vinyals_trainval") \
        else not (base["train"] & base["val"])
    assert base["train"] | base["val"] | base["test"] == set(characters["names"])
    train = pools["train"]
    index = {n: i for i, n in enumerate(characters["names"])}
    for c in (0, 4 * 57, train.num_classes - 4):
        name = train.names[c].removesuffix("@rot0")
        for r in range(4):
            assert train.names[c + r] == f"{name}@rot{90 * r}"
            want = torch.rot90(characters["images"][index[name]], r, dims=(-2, -1))
            assert torch.equal(train.images[c + r], want)
    alphabets = {s: {n.split("/")[0] for n in b} for s, b in base.items()}
    if protocol == "lake":
        assert base["test"] == set(load_split("lake")["evaluation"]) and len(alphabets["test"]) == 20
    if protocol == "protonets_vinyals":  # whole alphabets held out (Gurmukhi is split, as in ProtoNets' files)
        assert (len(alphabets["val"]), len(alphabets["test"])) == (5, 13)
        assert alphabets["train"] & alphabets["test"] == {"Gurmukhi"} and not alphabets["val"] & alphabets["train"]


@needs_omniglot
def test_omniglot_per_class_rotation_and_inversion(characters: dict, cache_dir: Path) -> None:
    """MAML's semantics on the real test split: 20-way tasks of distinct characters, each at a drawn angle."""
    as_class = TaskSampler(load_omniglot(ROOT, "test", cache_dir=cache_dir), ways=20, shots=1, queries=1)
    chars = [[as_class.pool.names[int(c)].split("@")[0] for c in t]
             for t in as_class.sample_indices(600, torch.Generator().manual_seed(0)).classes]
    shared = sum(len(set(c)) < 20 for c in chars) / 600
    assert 0.15 < shared < 0.45  # about 29% of rotation-as-class 20-way tasks repeat a character
    pool = load_omniglot(ROOT, "test", cache_dir=cache_dir, rotation="per_class", invert=False, resample="lanczos")
    assert pool.num_classes == 423 and pool.rotations == (0, 90, 180, 270)
    sampler = TaskSampler(pool, ways=20, shots=1, queries=1)
    idx = sampler.sample_indices(600, torch.Generator().manual_seed(0))
    assert all(len(set(t.tolist())) == 20 for t in idx.classes)
    assert torch.bincount(idx.rotations.flatten(), minlength=4).min() > 2500  # 12,000 draws, ~3,000 each
    batch = sampler.batch_from_indices(idx.slice(0, 2))
    for label in range(20):
        c, r = int(idx.classes[0, label]), int(idx.rotations[0, label])
        x = batch.support_x[0][batch.support_y[0] == label][0, 0]
        original = characters["images"][characters["names"].index(pool.names[c])]
        drawings = torch.rot90(255 - original, r, dims=(-2, -1)).float() / 255
        assert any(torch.equal(x, d) for d in drawings)
    assert float(batch.support_x.mean()) > 0.5  # not inverted: mostly white


@needs_omniglot
def test_omniglot_sampling(characters: dict, cache_dir: Path) -> None:
    train = load_omniglot(ROOT, "train", cache_dir=cache_dir)
    sampler = TaskSampler(train, ways=20, shots=5, queries=15)
    batch = sampler.sample(8, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (8, 100, 1, 28, 28) and batch.query_x.shape == (8, 300, 1, 28, 28)
    with pytest.raises(ValueError, match="drawings per class"):
        TaskSampler(train, ways=5, shots=10, queries=11)
    test = load_omniglot(ROOT, "test", cache_dir=cache_dir, rotations=(0,))
    assert test.num_classes == 423
    ev = list(evaluation_tasks(TaskSampler(test, 5, 1, 1), num_tasks=600, seed=0, batch_size=64))
    assert sum(len(b.support_x) for b in ev) == 600


@needs_mnist
def test_mnist_protocols(tmp_path: Path) -> None:
    from torchvision.datasets import MNIST

    test_ds = MNIST(root=ROOT, train=False, download=False)
    within_test = load_mnist(ROOT, "test", protocol="within", cache_dir=tmp_path)
    assert within_test.names == [f"MNIST/digit{d}" for d in range(5, 10)]
    assert within_test.counts.tolist() == [892, 958, 1028, 974, 1009]
    for row, digit in enumerate(range(5, 10)):
        want = test_ds.data[test_ds.targets == digit]
        assert torch.equal(within_test.images[row, : len(want)], want)
    train = load_mnist(ROOT, "train", protocol="within", cache_dir=tmp_path)
    assert train.counts.tolist() == [5923, 6742, 5958, 6131, 5842]
    assert train.images.shape == (5, 6742, 28, 28) and train.images.dtype == torch.uint8
    val = load_mnist(ROOT, "val", protocol="within", cache_dir=tmp_path)
    assert val.counts.tolist() == [5421, 5918, 6265, 5851, 5949]
    cross = load_mnist(ROOT, "test", protocol="cross_domain", cache_dir=tmp_path)
    assert cross.counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert float(cross.images.float().mean()) < 60  # strokes already bright, not inverted
    again = load_mnist(ROOT, "test", protocol="cross_domain", cache_dir=tmp_path)
    assert torch.equal(again.images, cross.images)
    for ways, shots in ((10, 1), (5, 1), (5, 5)):
        sampler = TaskSampler(cross, ways=ways, shots=shots, queries=15)
        batch = sampler.sample(4, torch.Generator().manual_seed(0))
        assert batch.support_x.shape == (4, ways * shots, 1, 28, 28)
        assert (batch.support_x.flatten(2).amax(-1) > 0).all()  # never a padding slot
    small = load_mnist(ROOT, "test", protocol="within", image_size=14, cache_dir=tmp_path)
    assert small.images.shape[-2:] == (14, 14)
