"""Few-shot MNIST (LeCun et al.) as class pools, read with torchvision from raw IDX files.

Protocols (there is no standard few-shot MNIST benchmark):

* ``"cross_domain"`` (Koch et al. 2015): meta-train on Omniglot (``load_omniglot``),
  meta-test on all 10 digits of the MNIST test set; only ``split="test"`` exists here.
  Paper anchor for 10-way 1-shot: 70.3% (siamese net), 26.5% (1-NN).
* ``"within"`` (ours, no paper number): disjoint digit classes. train = digits 0-4
  (MNIST training images), test = digits 5-9 (MNIST test images), val = digits 5-9 from
  the MNIST *training* images: image-disjoint from test but the same classes, because
  ten digits leave no room for a third class-disjoint 5-way split.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from meta.data.cache import load_or_build, source_fingerprint
from meta.data.errors import DataError
from meta.data.paths import resolve_cache_dir, resolve_data_root
from meta.data.pool import ClassPool

MNIST_PROTOCOLS: dict[str, dict[str, tuple[bool, tuple[int, ...]]]] = {
    # split -> (use MNIST training images?, digits)
    "within": {
        "train": (True, (0, 1, 2, 3, 4)),
        "val": (True, (5, 6, 7, 8, 9)),
        "test": (False, (5, 6, 7, 8, 9)),
    },
    "cross_domain": {"test": (False, tuple(range(10)))},
}
_RAW = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CACHE_FORMAT = 1
#: Sizes of the uncompressed raw IDX files (16-byte image header + 28*28 bytes per image, 8-byte label header).
_RAW_SIZES = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28, "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28, "t10k-labels-idx1-ubyte": 8 + 10000,
}


def check_mnist_sizes(data_root: Path, train: bool) -> None:
    """Raise a :class:`DataError` naming any raw file that exists but has the wrong size (truncated, damaged)."""
    raw = data_root / "MNIST" / "raw"
    for name in _RAW[train]:
        path = raw / name
        if path.is_file() and path.stat().st_size != _RAW_SIZES[name]:
            raise DataError(f"MNIST file {path} is truncated or damaged: {path.stat().st_size} bytes, expected "
                            f"{_RAW_SIZES[name]}; replace it with the uncompressed official file")


#: Where the raw files come from: data.download fetches Omniglot only, never MNIST.
MNIST_SOURCE = ("the four files from https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror of "
                "yann.lecun.com/exdb/mnist), gunzipped")
#: IDX headers: magic number (0x0803 images, 0x0801 labels) then the sizes, big-endian 32-bit each.
_HEADERS = {
    "train-images-idx3-ubyte": (0x803, 60000, 28, 28), "train-labels-idx1-ubyte": (0x801, 60000),
    "t10k-images-idx3-ubyte": (0x803, 10000, 28, 28), "t10k-labels-idx1-ubyte": (0x801, 10000),
}


def check_mnist_headers(data_root: Path, train: bool) -> None:
    """Raise a :class:`DataError` naming any raw file whose IDX header (magic number and sizes) is not MNIST's."""
    raw = data_root / "MNIST" / "raw"
    for name in _RAW[train]:
        path = raw / name
        expected = _HEADERS[name]
        with path.open("rb") as f:
            found = tuple(int.from_bytes(f.read(4), "big") for _ in expected)
        if found != expected:
            raise DataError(f"MNIST file {path} has a bad IDX header {[hex(v) for v in found]}, expected "
                            f"{[hex(v) for v in expected]} (magic number, then sizes): not the official "
                            f"uncompressed file; replace it with {MNIST_SOURCE}")


def _read_mnist(data_root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST  # imported lazily: torchvision is slow to import

    check_mnist_sizes(data_root, train)
    if all((data_root / "MNIST" / "raw" / name).is_file() for name in _RAW[train]):
        check_mnist_headers(data_root, train)
    try:
        ds = MNIST(root=str(data_root), train=train, download=False)
    except RuntimeError as err:
        files = ", ".join(_RAW[train])
        raise DataError(
            f"MNIST not found under {data_root}: expected the raw IDX files ({files}) in "
            f"{data_root / 'MNIST' / 'raw'}/ (torchvision's layout): put {MNIST_SOURCE} there, or point "
            f"META_DATA_ROOT or data.root at the folder that contains 'MNIST/' (data.download fetches Omniglot only)"
        ) from err
    return ds.data, ds.targets


def group_by_class(
    images: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images [n, H, W]`` with ``labels [n]`` -> padded ``[len(classes), max_count, H, W]``
    (original order within a class) and ``counts``; vectorized."""
    cls = torch.tensor(classes, dtype=torch.long)
    keep = torch.isin(labels, cls)
    images, labels = images[keep], labels[keep]
    # position of each label in `classes`
    lookup = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    lookup[cls] = torch.arange(len(classes))
    row = lookup[labels]
    order = torch.argsort(row, stable=True)
    row = row[order]
    counts = torch.bincount(row, minlength=len(classes))
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(row)) - starts[row]
    out = torch.zeros(len(classes), int(counts.max()), *images.shape[1:], dtype=images.dtype)
    out[row, col] = images[order]
    return out, counts


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    c, d = images.shape[:2]
    x = images.reshape(c * d, 1, *images.shape[2:]).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).reshape(c, d, size, size)


def load_mnist(
    root: str | Path | None,
    split: str,
    *,
    protocol: str = "within",
    image_size: int = 28,
    cache_dir: str | Path | None = None,
) -> ClassPool:
    """One split of few-shot MNIST as a ``ClassPool`` (see the module docstring).

    Images are uint8 with bright strokes (MNIST's own polarity, not inverted); classes
    have different image counts and are zero-padded to the largest (``counts`` says how
    many are real). ``image_size != 28`` resizes with antialiased bicubic interpolation.
    """
    if protocol not in MNIST_PROTOCOLS:
        raise ValueError(f"unknown MNIST protocol {protocol!r}; expected one of "
                         f"{tuple(MNIST_PROTOCOLS)}")
    splits = MNIST_PROTOCOLS[protocol]
    if split not in splits:
        extra = (" (cross_domain meta-trains and validates on Omniglot: use load_omniglot)"
                 if protocol == "cross_domain" else "")
        raise ValueError(f"MNIST protocol {protocol!r} has no split {split!r}; it has "
                         f"{tuple(splits)}{extra}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    train, digits = splits[split]
    data_root = resolve_data_root(root)
    raw = data_root / "MNIST" / "raw"
    sources = [source_fingerprint(raw / f) if (raw / f).is_file() else None for f in _RAW[train]]
    if None in sources:
        _read_mnist(data_root, train)  # raises a DataError naming the expected files
    check_mnist_sizes(data_root, train)  # before a cache keyed by these files is trusted
    check_mnist_headers(data_root, train)

    def build() -> dict[str, torch.Tensor]:
        images, labels = _read_mnist(data_root, train)
        grouped, counts = group_by_class(images, labels, digits)
        return {"images": _resize(grouped, image_size), "counts": counts}

    spec = {"format": _CACHE_FORMAT, "dataset": "mnist", "train": train, "digits": digits,
            "image_size": image_size, "sources": sources}
    content, _ = load_or_build(resolve_cache_dir(cache_dir) / "mnist",
                               f"mnist-{'train' if train else 'test'}-"
                               + "".join(map(str, digits)), spec, build)
    names = [f"MNIST/digit{d}" for d in digits]
    return ClassPool(content["images"], content["counts"].long(), names)
