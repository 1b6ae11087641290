"""``--help``, ``--list-presets`` and docs/configuration.md, generated from the structured config so that they
cannot drift from it.

Every key of :class:`meta.training.config.Config` is listed with its type, its default (the dataclass default as
``configs/base.yaml`` sets it), its allowed values (:data:`meta.training.config.CHOICES`) and its meaning: the
comment written beside (or just above) the field in ``meta/training/config.py``.

    python -m meta.training.cli_help --markdown > docs/configuration.md   # regenerate the reference page
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from collections.abc import Iterable, Sequence

from omegaconf import OmegaConf

from meta.training import config as config_module
from meta.training.config import (
    CHOICES,
    CONFIG_DIR,
    EVAL_KEYS,
    RESUME_SAFE_KEYS,
    Config,
    available_presets,
    load_config,
)

#: the preset ``python scripts/train_maml.py`` trains when its command line names none
DEFAULT_PRESET = "omniglot_5w1s_quick"
#: the flags answered instead of training (everything else on a command line is ``key=value``)
HELP_FLAGS = ("-h", "--help")
LIST_PRESETS_FLAG = "--list-presets"



def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class source: the trailing ``# ...`` of its line, else the comment lines
    right above it."""
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"(\w+)\s*:[^=]+=.*?(?:#\s*(.*))?$", stripped)
        if match:
            comments[match.group(1)] = (match.group(2) or " ".join(above)).strip()
        above = []
    return comments


def config_keys(cls: type = Config, prefix: str = "") -> Iterable[tuple[str, str, str]]:
    """``(key, type, meaning)`` for every leaf key of the config, in declaration order."""
    comments = _field_comments(cls)
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        sub = getattr(config_module, str(hints[f.name]), None)
        if dataclasses.is_dataclass(sub):
            yield from config_keys(sub, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", str(hints[f.name]), comments.get(f.name, "")




def _default_text(value: object) -> str:
    """A default as YAML writes it: null, true/false, numbers and lists as they are."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def config_rows(default_preset: str | None = DEFAULT_PRESET) -> Iterable[tuple[str, str, str, str, str]]:
    """``(key, type, default, allowed values, meaning)`` of every key. Defaults are the config's own
    (``configs/base.yaml``, where every preset starts), except ``preset``'s: the one a command line without
    ``preset=`` trains."""
    defaults = load_config([])
    for key, kind, meaning in config_keys():
        default = default_preset if key == "preset" and default_preset else OmegaConf.select(defaults, key)
        allowed = ", ".join(map(str, CHOICES[key])) if key in CHOICES else ""
        yield key, kind, _default_text(default), allowed, meaning


def config_help(default_preset: str | None = DEFAULT_PRESET) -> str:
    """Every key with its type, default, allowed values and meaning, one per line."""
    return "\n".join(f"  {key} ({kind}, default {default})" + (f" {{{allowed}}}" if allowed else "")
                     + (f": {meaning}" if meaning else "")
                     for key, kind, default, allowed, meaning in config_rows(default_preset))


def preset_summary(name: str, limit: int | None = 150) -> str:
    """The first sentence of a preset's header comment ("et al." does not end one), cut to ``limit``
    characters (``None``: whole)."""
    path = CONFIG_DIR / f"{name}.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # --help still lists every key; loading this preset names the bad byte
        return f"(unreadable: {path} is not UTF-8 text; save it as UTF-8)"
    header = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith("# data:"):
            break
        header.append(line.lstrip("# ").strip())
    text = " ".join(header)
    end = re.search(r"(?<! al)\.\s", text)
    text = text if end is None else text[: end.start() + 1]
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def preset_help(default_preset: str | None = DEFAULT_PRESET) -> str:
    """Every preset with the first sentence of its header comment, the default one marked."""
    return "\n".join(f"  {name}{' (default)' if name == default_preset else ''}: {preset_summary(name)}"
                     for name in available_presets())


def script_help(doc: str, default_preset: str | None = DEFAULT_PRESET) -> str:
    """A script's docstring, then every preset and every key."""
    return (f"{doc.strip()}\n\nPresets (preset=NAME; configs/; without preset= the script trains "
            f"{default_preset}):\n{preset_help(default_preset)}\n\n"
            f"Keys (key=value; lists as [a,b], dicts as {{k: v}}; defaults are configs/base.yaml's, where every "
            f"preset starts; --show-config preset=NAME prints what a preset sets):\n"
            f"{config_help(default_preset)}\n")


def info_text(doc: str, argv: Sequence[str], default_preset: str | None = DEFAULT_PRESET) -> str | None:
    """What a training command line asks to be told instead of training: ``--help`` (``-h``) gives
    :func:`script_help`, ``--list-presets`` one preset name per line; ``None`` for a command line that trains."""
    if set(HELP_FLAGS) & set(argv):
        return script_help(doc, default_preset)
    if LIST_PRESETS_FLAG in argv:
        return "\n".join(f"{name}{' (default)' if name == default_preset else ''}" for name in available_presets())
    return None


# ---- docs/configuration.md ---------------------------------------------------------------------------------

def _cell(text: str) -> str:
    """Text for one Markdown table cell (pipes escaped)."""
    return text.replace("|", "\\|")


def _code_list(keys: Iterable[str]) -> str:
    return ", ".join(f"`{key}`" for key in keys)


def config_markdown(default_preset: str | None = DEFAULT_PRESET) -> str:
    """docs/configuration.md: every key with its type, default, allowed values and meaning, grouped by section;
    every preset; the keys that may change on resume and the keys evaluation accepts."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m meta.training.cli_help --markdown > docs/configuration.md` from the comment "
        "beside each field of meta/training/config.py and the header of each preset in configs/; "
        "tests/test_docs.py fails when this file differs from it. Do not edit by hand. -->",
        "",
        "Every key can be set as `key=value` on the command line of `scripts/train_maml.py` (or in the override "
        "list of `load_config`); lists are written `[a,b]`, dicts `{k: v}`. An unknown key, a wrong type or a "
        "value outside the allowed ones fails at once and names the key. A config is built in layers: the "
        "dataclass defaults, `configs/base.yaml`, the preset (after the presets it `extends`), then the command "
        "line. The defaults below are the config's own (`configs/base.yaml`), where every preset starts; "
        "`python scripts/train_maml.py --show-config preset=NAME` prints what a preset sets, and "
        "`python scripts/train_maml.py --help` prints this list.",
    ]
    section = None
    for key, kind, default, allowed, meaning in config_rows(default_preset):
        group = key.split(".")[0] if "." in key else "run"
        if group != section:
            section = group
            title = "The run" if group == "run" else f"`{group}.*`"
            out += ["", f"## {title}", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        allowed_text = _cell(_code_list(allowed.split(", "))) if allowed else ""
        out.append(f"| `{key}` | `{_cell(kind)}` | `{_cell(default)}` | {allowed_text} | {_cell(meaning)} |")
    out += ["", "## Presets", "",
            f"`preset=NAME` names the file `configs/NAME.yaml`; without one, `scripts/train_maml.py` trains "
            f"`{default_preset}`. Every knob of a paper preset cites its source in the file "
            f"([protocols.md](protocols.md) collects them); `--list-presets` prints the names.", "",
            "| preset | what it is (the first sentence of its header) |", "|---|---|"]
    out += [f"| `{name}` | {_cell(preset_summary(name, 240))} |" for name in available_presets()]
    out += ["", "## Keys that may change when a run resumes", "",
            "`resume=true` continues with the config saved in the checkpoint and refuses any other key that differs "
            f"(`meta.training.config.RESUME_SAFE_KEYS`): {_code_list(RESUME_SAFE_KEYS)}.", "",
            "## Keys that apply to a saved run", "",
            "`scripts/evaluate.py RUN_OR_CHECKPOINT key=value ...` accepts these keys and refuses the others "
            f"(`meta.training.config.EVAL_KEYS`): {_code_list(EVAL_KEYS)}."]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Print the configuration reference: as docs/configuration.md's Markdown, or as ``--help`` lists it."""
    parser = argparse.ArgumentParser(prog="python -m meta.training.cli_help", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", help="docs/configuration.md's text")
    args = parser.parse_args(argv)
    print(config_markdown() if args.markdown else config_help(), end="" if args.markdown else "\n")


if __name__ == "__main__":
    main()
