"""Each paper preset pins its paper's data protocol (split, rotation semantics, resize, inversion), and the data
keys reject bad values with one line that names the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from meta.training.config import ConfigError, available_presets, load_config

# (protocol, rotation, rotate_splits, resample, invert), as each paper's code does it (see the presets' comments)
MAML = ("maml_random", "per_class", ["train", "val", "test"], "maml", True)
EXPECTED = {
    **{f"{a}_omniglot_{c}": MAML for a in ("maml", "fomaml") for c in ("5w1s", "5w5s", "20w1s", "20w5s")},
    "maml_mlp_omniglot_5w1s": MAML, "maml_mlp_omniglot_5w5s": MAML,
    "maml_omniglot_5w1s_cpu30": MAML, "omniglot_5w1s_quick": MAML, "anil_omniglot_5w1s": MAML,
    "metasgd_omniglot_5w1s": MAML, "metacurvature_omniglot_5w1s": MAML, "clipped_sgd_omniglot_5w1s": MAML,
    "protonets_omniglot_5w1s": ("protonets_vinyals", "as_class", ["train", "val", "test"], "maml", True),
    "reptile_omniglot_5w1s": ("reptile", "as_class", ["train", "val"], "maml", False),
    "mamlpp_omniglot_5w1s": ("mamlpp", "per_class", ["train"], "maml", False),
    "imaml_omniglot_5w1s": ("imaml", "per_class", ["train", "val", "test"], "lanczos", False),
    # the other cells of the same papers' tables: the same data protocol as their 5w1s preset
    **{f"{a}_omniglot_{c}": MAML for a in ("metasgd", "anil") for c in ("5w5s", "20w1s", "20w5s")
       if a == "metasgd" or c.startswith("20")},
    **{f"protonets_omniglot_{c}": ("protonets_vinyals", "as_class", ["train", "val", "test"], "maml", True)
       for c in ("5w5s", "20w1s", "20w5s")},
    **{f"reptile_omniglot_{c}": ("reptile", "as_class", ["train", "val"], "maml", False)
       for c in ("5w5s", "20w1s", "20w5s")},
    **{f"mamlpp_omniglot_{c}": ("mamlpp", "per_class", ["train"], "maml", False) for c in ("5w5s", "20w1s", "20w5s")},
    # MAML++'s configs of today (HEAD 8696470): the same data protocol as the paper-era presets they extend
    **{f"mamlpp_omniglot_{c}_2019": ("mamlpp", "per_class", ["train"], "maml", False)
       for c in ("5w1s", "5w5s", "20w1s", "20w5s")},
    **{f"imaml_omniglot_{c}": ("imaml", "per_class", ["train", "val", "test"], "lanczos", False)
       for c in ("5w5s", "20w1s", "20w5s")},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_paper_presets_pin_their_papers_data_protocol(preset: str) -> None:
    data = load_config([f"preset={preset}"]).data
    got = (data.protocol, data.rotation, list(data.rotate_splits), data.resample, data.invert)
    assert got == EXPECTED[preset]
    assert list(data.rotations) == [0, 90, 180, 270]


@pytest.mark.parametrize("preset", [p for p in available_presets()])
def test_every_preset_cites_its_data_source(preset: str) -> None:
    from meta.training.config import CONFIG_DIR, preset_layers

    root = preset_layers(preset)[0][0]  # a preset that extends another takes its data section from its ancestor
    lines = (CONFIG_DIR / f"{root}.yaml").read_text().splitlines()
    assert any(line.startswith("# data:") for line in lines), f"{root}: no '# data:' source line"
    assert "data:" in lines, f"{root}: no data: section of its own"


def test_reptile_and_mamlpp_test_on_unrotated_characters() -> None:
    for preset in ("reptile_omniglot_5w1s", "mamlpp_omniglot_5w1s"):
        assert "test" not in load_config([f"preset={preset}"]).data.rotate_splits


@pytest.mark.parametrize(("override", "message"), [
    ("data.protocol=vinyals", "data.protocol='vinyals' was renamed.*data.protocol=maml_random.*protonets_vinyals"),
    ("data.protocol=nope", "data.protocol='nope' is not an Omniglot protocol"),
    ("data.rotation=random", "data.rotation='random' is not one of"),
    ("data.resample=bilinear", "data.resample='bilinear' is not one of"),
    ("data.rotations=[0,45]", r"data.rotations=\[0, 45\] must be distinct angles"),
    ("data.rotate_splits=[training]", r"data.rotate_splits has unknown split\(s\) \['training'\]"),
    ("data.invert=maybe", "data.invert"),
])
def test_bad_data_values_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config([override])
    assert "\n" not in str(error.value)


def test_protocol_is_only_checked_for_omniglot() -> None:
    assert load_config(["data.dataset=mnist", "data.protocol=within", "data.rotations=[0]"]).data.protocol == "within"
    cfg = load_config(["preset=mnist_cross_domain_5w1s"])
    assert (cfg.data.protocol, cfg.data.test_protocol) == ("maml_random", "cross_domain")


def test_a_run_saved_with_the_old_split_name_loads_with_the_new_one() -> None:
    saved = load_config([])
    old = {**OmegaConf.to_container(saved), "preset": None}
    old["data"]["protocol"] = "vinyals"
    with pytest.raises(ConfigError, match="pass data.protocol=maml_random"):
        load_config([], base=old)
    assert load_config(["data.protocol=maml_random"], base=old).data.protocol == "maml_random"
