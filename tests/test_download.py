"""data.download=true without the network: the Omniglot download path against file:// URLs of the local zips (a
right and a wrong md5) and an unreachable server (connection refused on localhost). Tests never download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import meta.data.omniglot as omniglot
from meta.data import DataError
from meta.data.download import file_md5
from meta.data.omniglot import URLS, load_omniglot_characters

LOCAL = Path(os.environ.get("META_DATA_ROOT", "/nonexistent")) / "omniglot"
HAS_ZIPS = all((LOCAL / f"images_{s}.zip").is_file() for s in ("background", "evaluation"))


def test_official_urls_and_md5s_are_those_torchvision_checks() -> None:
    from torchvision.datasets import Omniglot  # an independent record of the official zips

    for key, (url, md5) in URLS.items():
        assert url == f"{Omniglot.download_url_prefix}/images_{key}.zip"
        assert md5 == Omniglot.zips_md5[f"images_{key}"]


def one_line_error(root: Path) -> str:
    with pytest.raises(DataError) as error:
        load_omniglot_characters(root, cache_dir=root / "cache", download=True)
    message = str(error.value)
    assert "\n" not in message and "data.root=" in message and "META_DATA_ROOT" in message
    assert str(root / "omniglot") in message and "images_background.zip" in message
    return message


def test_wrong_checksum_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "served" / "images_background.zip"
    fake.parent.mkdir()
    fake.write_bytes(b"not the official zip")
    monkeypatch.setattr(omniglot, "URLS", {key: (fake.as_uri(), md5) for key, (_, md5) in URLS.items()})
    message = one_line_error(tmp_path / "data")
    assert f"md5 {file_md5(fake)}, expected {URLS['background'][1]}" in message and "nothing was written" in message
    assert list((tmp_path / "data" / "omniglot").iterdir()) == []  # no zip, no partial file


def test_no_network_says_what_to_put_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable = "http://127.0.0.1:9/images_background.zip"  # the discard port: connection refused at once
    monkeypatch.setattr(omniglot, "URLS", {key: (unreachable, md5) for key, (_, md5) in URLS.items()})
    message = one_line_error(tmp_path / "data")
    assert message.startswith(f"could not download {unreachable}") and "Without network" in message
    assert URLS["evaluation"][1] in message  # the md5 a copy must have
    assert list((tmp_path / "data" / "omniglot").iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ZIPS, reason="META_DATA_ROOT is unset or has no omniglot/images_*.zip to serve")
def test_download_from_file_urls_with_the_right_md5_then_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    served = {key: (LOCAL / f"images_{key}.zip") for key in URLS}
    monkeypatch.setattr(omniglot, "URLS", {key: (path.as_uri(), file_md5(path)) for key, path in served.items()})
    root = tmp_path / "data"
    data, _ = load_omniglot_characters(root, cache_dir=tmp_path / "cache", download=True)
    assert len(data["names"]) == 1623
    for path in served.values():
        assert (root / "omniglot" / path.name).read_bytes() == path.read_bytes()
    assert capfd.readouterr().err.count("[meta.data] downloading") == 2
    load_omniglot_characters(root, cache_dir=tmp_path / "cache", download=True)  # present: nothing downloaded
    assert "downloading" not in capfd.readouterr().err
