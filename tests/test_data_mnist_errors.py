"""MNIST's raw files and data.download: one-line errors naming the file and where to get it (issue 24). No test
downloads anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from meta.data import load_mnist
from meta.data.errors import DataError
from meta.data.mnist import _RAW_SIZES
from meta.training.config import ConfigError, load_config


def _fake_mnist(root: Path, images_header: bytes) -> Path:
    """MNIST/raw with test files of the official sizes: a valid label header, the given image header."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images_header + bytes(_RAW_SIZES[images.name] - len(images_header)))
    labels = bytes.fromhex("00000801") + (10000).to_bytes(4, "big") + bytes(10000)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels)
    return images


@pytest.mark.parametrize("header", [bytes(16), bytes.fromhex("00000803") + (10000).to_bytes(4, "big") + bytes(8)],
                         ids=["zero_magic", "zero_rows"])
def test_mnist_file_with_bad_header_is_a_data_error_naming_it(tmp_path, header):
    images = _fake_mnist(tmp_path / "data", header)
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path / "data", "test", protocol="within", cache_dir=tmp_path / "cache")
    assert f"MNIST file {images} has a bad IDX header" in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_mnist_says_where_to_get_it_not_download_true(tmp_path):
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, "test", protocol="within", cache_dir=tmp_path / "cache")
    assert "download=True" not in str(error.value) and "ossci-datasets.s3.amazonaws.com/mnist" in str(error.value)


def test_download_is_refused_for_mnist():
    with pytest.raises(ConfigError) as error:
        load_config(["data.dataset=mnist", "data.protocol=within", "data.download=true"])
    assert str(error.value).startswith("data.download=true fetches Omniglot only; MNIST is read from")
    assert "\n" not in str(error.value)
    # the cross-domain protocol downloads Omniglot, its training data set, and reads MNIST for the test
    load_config(["data.test_dataset=mnist", "data.test_protocol=cross_domain", "data.download=true"])
