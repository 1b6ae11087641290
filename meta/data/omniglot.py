"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) from the official zip/folder layout.

Layout under the data root::

    <root>/omniglot/images_background.zip   (or extracted: <root>/omniglot/images_background/)
    <root>/omniglot/images_evaluation.zip   (or extracted: <root>/omniglot/images_evaluation/)

each holding ``images_*/<Alphabet>/characterNN/XXXX_YY.png``. Files are accepted by their
content (counts and decodable PNGs), not by zip md5, so re-encoded copies work. The
decoded, resized and inverted images (uint8, stroke 255, background 0) are cached in the
cache directory, keyed by the source files' sizes/mtimes and the preprocessing options.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from meta.data.cache import cache_key, load_or_build, source_fingerprint
from meta.data.download import ChecksumError, download_file
from meta.data.errors import DataError
from meta.data.paths import resolve_cache_dir, resolve_data_root
from meta.data.pool import ClassPool
from meta.data.splits import SPLIT_NAMES, check_protocol, load_split

SETS = {"background": "images_background", "evaluation": "images_evaluation"}
URLS = {
    "background": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
    ),
    "evaluation": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
    ),
}
RESAMPLE = ("lanczos", "maml")
ROTATIONS = (0, 90, 180, 270)
# as_class: every (character, angle) is its own class (Santoro et al., ProtoNets, Reptile's training set);
# per_class: tasks hold distinct characters, each shown at one angle drawn per task and class (MAML, MAML++, iMAML);
# none: unrotated characters only
ROTATION_MODES = ("as_class", "per_class", "none")
_CACHE_FORMAT = 1
_DRAWING_RE = re.compile(r"^(\d+)_(\d+)\.png$")


@dataclass(frozen=True)
class OmniglotCounts:
    """Expected content: ``(alphabets, characters)`` per set (None: not checked) and
    drawings per character. The default is the official data set."""

    background: tuple[int, int] | None = (30, 964)
    evaluation: tuple[int, int] | None = (20, 659)
    drawings: int = 20


OFFICIAL_COUNTS = OmniglotCounts()


def _offline_hint(odir: Path) -> str:
    return (
        f"Without network: copy images_background.zip and images_evaluation.zip (from "
        f"https://github.com/brendenlake/omniglot/tree/master/python, md5 {URLS['background'][1]} and "
        f"{URLS['evaluation'][1]}) into {odir}/, or point data.root=... (or META_DATA_ROOT) at a folder whose "
        f"omniglot/ holds them."
    )


def _where_hint(odir: Path) -> str:
    return (
        f"Omniglot files belong in {odir}/images_background.zip and "
        f"{odir}/images_evaluation.zip (or extracted as {odir}/images_background/<Alphabet>/"
        f"characterNN/*.png and likewise images_evaluation/). Point the code at a copy with "
        f"META_DATA_ROOT or data.root=... (the folder that contains 'omniglot/'), or add data.download=true "
        f"(download=True from Python) to fetch the official zips from github.com/brendenlake/omniglot."
    )


class _Source:
    """One official set, read from its zip or extracted folder."""

    def __init__(self, odir: Path, set_key: str) -> None:
        self.set_key, self.folder_name = set_key, SETS[set_key]
        zip_path, dir_path = odir / f"{self.folder_name}.zip", odir / self.folder_name
        if zip_path.is_file():
            self.kind, self.path = "zip", zip_path
        elif dir_path.is_dir():
            self.kind, self.path = "folder", dir_path
        else:
            raise DataError(
                f"Omniglot {set_key} set not found: neither {zip_path} nor {dir_path}/ exists. "
                + _where_hint(odir)
            )

    def __str__(self) -> str:
        return str(self.path)

    def entries(self) -> dict[str, list[str]]:
        """``{"Alphabet/characterNN": sorted PNG file names}``, empty characters included."""
        chars: dict[str, list[str]] = {}
        if self.kind == "zip":
            try:
                with zipfile.ZipFile(self.path) as zf:
                    names = zf.namelist()
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(f"{self.path} is not a readable zip file ({err}); replace it "
                                f"with the official images_{self.set_key}.zip") from err
            for name in names:
                parts = name.rstrip("/").split("/")
                if parts[0] != self.folder_name:
                    continue
                if len(parts) == 3 and name.endswith("/"):
                    chars.setdefault(f"{parts[1]}/{parts[2]}", [])
                elif len(parts) == 4 and parts[3].endswith(".png"):
                    chars.setdefault(f"{parts[1]}/{parts[2]}", []).append(parts[3])
        else:
            for alphabet in sorted(os.listdir(self.path)):
                adir = self.path / alphabet
                if not adir.is_dir():
                    continue
                for character in sorted(os.listdir(adir)):
                    cdir = adir / character
                    if cdir.is_dir():
                        pngs = [f for f in os.listdir(cdir) if f.endswith(".png")]
                        chars[f"{alphabet}/{character}"] = pngs
        return {k: sorted(v) for k, v in sorted(chars.items())}

    def reader(self) -> tuple[Callable[[str, str], bytes], Callable[[], None]]:
        """``(read(character, file) -> bytes, close)``."""
        if self.kind == "zip":
            zf = zipfile.ZipFile(self.path)
            return (lambda c, f: zf.read(f"{self.folder_name}/{c}/{f}")), zf.close
        return (lambda c, f: (self.path / c / f).read_bytes()), (lambda: None)

    def fingerprint(self) -> str:
        return cache_key({"kind": self.kind, "files": source_fingerprint(self.path)})


def _check_set(source: _Source, chars: dict[str, list[str]], counts: OmniglotCounts) -> None:
    odir = source.path.parent
    if not chars:
        raise DataError(f"{source} contains no {source.folder_name}/<Alphabet>/characterNN/ "
                        f"folders. " + _where_hint(odir))
    expected = getattr(counts, source.set_key)
    alphabets = {c.split("/")[0] for c in chars}
    if expected is not None and (len(alphabets), len(chars)) != tuple(expected):
        raise DataError(
            f"incomplete Omniglot {source.set_key} set in {source}: found {len(alphabets)} "
            f"alphabets and {len(chars)} characters, expected {expected[0]} and {expected[1]}. "
            + _where_hint(odir)
        )
    bad = [(c, f) for c, f in chars.items() if len(f) != counts.drawings]
    if bad:
        lines = []
        for c, files in bad[:5]:
            drawers = {int(m.group(2)) for f in files if (m := _DRAWING_RE.match(f))}
            missing = sorted(set(range(1, counts.drawings + 1)) - drawers)
            hint = f" (missing drawers {missing})" if missing else ""
            lines.append(f"{source.folder_name}/{c}: {len(files)} drawings{hint}")
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(
            f"corrupt Omniglot {source.set_key} set in {source}: every character must have "
            f"{counts.drawings} drawings, but " + "; ".join(lines) + more
            + ". Replace the file/folder with a complete copy. " + _where_hint(odir)
        )


def _sources(odir: Path, download: bool) -> dict[str, _Source]:
    out = {}
    for key in SETS:
        try:
            out[key] = _Source(odir, key)
        except DataError:
            if not download:
                raise
            url, md5 = URLS[key]
            try:
                download_file(url, odir / f"{SETS[key]}.zip", md5)
            except ChecksumError as err:
                raise DataError(f"{err}: the download is damaged or the file changed upstream; retry, or fetch "
                                f"it yourself. " + _offline_hint(odir)) from None
            except OSError as err:
                reason = getattr(err, "reason", None) or err
                raise DataError(f"could not download {url} into {odir} ({reason}): no network, or the folder is "
                                f"not writable. " + _offline_hint(odir)) from None
            out[key] = _Source(odir, key)
    return out


def list_omniglot_characters(
    omniglot_dir: str | Path, expected_counts: OmniglotCounts = OFFICIAL_COUNTS
) -> dict[str, list[str]]:
    """Sorted ``"Alphabet/characterNN"`` names of each set, after checking the counts
    (no image is decoded)."""
    out = {}
    for key, source in _sources(Path(omniglot_dir), download=False).items():
        chars = source.entries()
        _check_set(source, chars, expected_counts)
        out[key] = list(chars)
    _check_disjoint(out)
    return out


def _check_disjoint(sets: dict[str, Sequence[str]]) -> None:
    both = {n.split("/")[0] for n in sets["background"]} & {
        n.split("/")[0] for n in sets["evaluation"]}
    if both:
        raise DataError(f"alphabets {sorted(both)[:5]} appear in both the background and the "
                        f"evaluation set; the Omniglot copy is mixed up")


def _preprocess(data: bytes, image_size: int, resample: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if resample == "lanczos":  # true LANCZOS on grayscale
            im = im.convert("L")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        else:  # "maml": resize the 1-bit image as-is; PIL then silently uses NEAREST
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
            im = im.convert("L")
        return 255 - np.asarray(im, dtype=np.uint8)  # strokes bright


def read_omniglot(
    omniglot_dir: str | Path,
    image_size: int = 28,
    *,
    resample: str = "lanczos",
    expected_counts: OmniglotCounts = OFFICIAL_COUNTS,
    download: bool = False,
) -> dict[str, Any]:
    """Decode both sets (no cache). Returns ``{"names": [...], "sets": [...],
    "images": uint8 [characters, drawings, S, S]}`` with characters in sorted name order,
    drawings in file-name order, strokes 255 and background 0."""
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; expected one of {RESAMPLE}")
    sources = _sources(Path(omniglot_dir), download)
    listing = {}
    for key, source in sources.items():
        listing[key] = source.entries()
        _check_set(source, listing[key], expected_counts)
    _check_disjoint(listing)
    items = sorted((name, key, files) for key in listing for name, files in listing[key].items())
    images = np.empty((len(items), expected_counts.drawings, image_size, image_size), np.uint8)
    readers = {key: source.reader() for key, source in sources.items()}
    try:
        for i, (name, key, files) in enumerate(items):
            read = readers[key][0]
            for j, file in enumerate(files):
                where = f"{SETS[key]}/{name}/{file}"
                try:
                    images[i, j] = _preprocess(read(name, file), image_size, resample)
                except Exception as err:  # noqa: BLE001 - reported with its location
                    raise DataError(
                        f"cannot decode {where} in {sources[key]} ({type(err).__name__}: {err}); "
                        f"the file is corrupt, replace it with a good copy. "
                        + _where_hint(Path(omniglot_dir))
                    ) from err
    finally:
        for _, close in readers.values():
            close()
    return {
        "names": [n for n, _, _ in items],
        "sets": [k for _, k, _ in items],
        "images": torch.from_numpy(images),
    }


def load_omniglot_characters(
    root: str | Path | None = None,
    *,
    image_size: int = 28,
    resample: str = "lanczos",
    cache_dir: str | Path | None = None,
    download: bool = False,
    expected_counts: OmniglotCounts = OFFICIAL_COUNTS,
) -> tuple[dict[str, Any], bool]:
    """All characters of both sets via the cache: ``(read_omniglot-style dict, rebuilt)``."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; expected one of {RESAMPLE}")
    odir = resolve_data_root(root) / "omniglot"
    sources = _sources(odir, download)
    spec = {
        "format": _CACHE_FORMAT,
        "dataset": "omniglot",
        "sources": {k: s.fingerprint() for k, s in sources.items()},
        "image_size": image_size,
        "resample": resample,
        "invert": True,
        "expected_counts": asdict(expected_counts),
    }
    return load_or_build(
        resolve_cache_dir(cache_dir) / "omniglot", "omniglot", spec,
        lambda: read_omniglot(odir, image_size, resample=resample,
                              expected_counts=expected_counts),
    )


def rotate_classes(
    images: torch.Tensor, names: Sequence[str], rotations: Iterable[int]
) -> tuple[torch.Tensor, list[str]]:
    """Make every (class, rotation) its own class: ``[C, D, H, W] -> [C*R, D, H, W]``,
    class-major (all rotations of one class are adjacent), names ``"<name>@rot<deg>"``.
    Rotation is counter-clockwise by ``deg`` degrees (``torch.rot90``)."""
    rotations = tuple(rotations)
    rotated = torch.stack([torch.rot90(images, deg // 90, dims=(-2, -1)) for deg in rotations], 1)
    out = rearrange(rotated, "c r d h w -> (c r) d h w")
    return out, [f"{n}@rot{deg}" for n in names for deg in rotations]


def _check_rotations(rotations: Iterable[int], rotate_splits: Iterable[str], rotation: str) -> tuple:
    rotations, rotate_splits = tuple(rotations), tuple(rotate_splits)
    if rotation not in ROTATION_MODES:
        raise ValueError(f"unknown rotation mode {rotation!r}; expected one of {ROTATION_MODES}")
    bad = [r for r in rotations if r not in ROTATIONS]
    if bad or len(set(rotations)) != len(rotations):
        raise ValueError(f"rotations must be distinct values from {ROTATIONS}, got {rotations}")
    bad_splits = [s for s in rotate_splits if s not in SPLIT_NAMES]
    if bad_splits:
        raise ValueError(f"unknown split(s) {bad_splits} in rotate_splits; expected {SPLIT_NAMES}")
    return rotations, rotate_splits


def load_omniglot(
    root: str | Path | None,
    split: str,
    *,
    protocol: str = "maml_random",
    image_size: int = 28,
    rotation: str = "as_class",
    rotations: Iterable[int] = ROTATIONS,
    rotate_splits: Iterable[str] = SPLIT_NAMES,
    invert: bool = True,
    cache_dir: str | Path | None = None,
    download: bool = False,
    resample: str = "lanczos",
    splits: dict[str, Any] | None = None,
    expected_counts: OmniglotCounts = OFFICIAL_COUNTS,
) -> ClassPool:
    """One split of Omniglot as a ``ClassPool``.

    ``split`` is "train", "val" or "test" of ``protocol`` (a committed split file, see
    ``meta.data.splits``). If ``split`` is in ``rotate_splits`` and ``rotations`` is not
    empty, ``rotation`` says what the angles mean: ``"as_class"`` makes one class per
    (character, angle) (the rotations of a character never cross a split);
    ``"per_class"`` keeps one class per character and lets the sampler draw one angle per
    class and task (``ClassPool.rotations``); ``"none"`` (or a split not in
    ``rotate_splits``) is unrotated. ``invert=True`` gives bright strokes on a dark
    background (MAML, ProtoNets), ``False`` the PNGs' dark strokes on white (Reptile,
    MAML++, iMAML). ``root`` is the data root (None: ``$META_DATA_ROOT`` or the default).
    ``resample="maml"`` reproduces the MAML code's resize of 1-bit images (PIL falls back to
    nearest); ``splits`` and ``expected_counts`` replace the committed split and the
    official counts (fixtures).
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
    check_protocol(protocol)
    rotations, rotate_splits = _check_rotations(rotations, rotate_splits, rotation)
    split_def = splits if splits is not None else load_split(protocol)
    data, _ = load_omniglot_characters(
        root, image_size=image_size, resample=resample, cache_dir=cache_dir,
        download=download, expected_counts=expected_counts,
    )
    index = {n: i for i, n in enumerate(data["names"])}
    members = list(split_def[split])
    missing = [n for n in members if n not in index]
    if missing:
        raise DataError(
            f"{len(missing)} characters of the {protocol} {split} split are not in the data "
            f"(e.g. {missing[:3]}); the Omniglot copy does not match the official names"
        )
    images = data["images"][torch.tensor([index[n] for n in members], dtype=torch.long)]
    if not invert:  # the cache holds bright strokes; the PNGs have dark strokes on white
        images = 255 - images
    names, pool_rotations = members, (0,)
    if split in rotate_splits and rotations and rotation == "as_class":
        images, names = rotate_classes(images, members, rotations)
    elif split in rotate_splits and rotations and rotation == "per_class":
        pool_rotations = rotations
    counts = torch.full((len(names),), images.shape[1], dtype=torch.long)
    return ClassPool(images.contiguous(), counts, names, pool_rotations)
