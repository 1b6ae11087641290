"""``--help`` text generated from the structured config, so that it cannot drift from it.

Every key of :class:`meta.training.config.Config` is listed with its type, its default (the dataclass default as
``configs/base.yaml`` sets it), its allowed values (:data:`meta.training.config.CHOICES`) and its meaning: the
comment written beside (or just above) the field in ``meta/training/config.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterable

from omegaconf import OmegaConf

from meta.training import config as config_module
from meta.training.config import CHOICES, CONFIG_DIR, Config, available_presets, load_config


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


def config_help() -> str:
    """Every key with its type, default, allowed values and meaning, one per line."""
    defaults = load_config([])
    lines = []
    for key, kind, meaning in config_keys():
        default = OmegaConf.select(defaults, key)
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default)
        allowed = f" {{{', '.join(map(str, CHOICES[key]))}}}" if key in CHOICES else ""
        default_text = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        lines.append(f"  {key} ({kind}, default {default_text}){allowed}" + (f": {meaning}" if meaning else ""))
    return "\n".join(lines)


def preset_help() -> str:
    """Every preset with the first line of its header comment."""
    lines = []
    for name in available_presets():
        header = []
        for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
            if not line.startswith("#") or line.startswith("# data:"):
                break
            header.append(line.lstrip("# ").strip())
        text = " ".join(header)
        end = re.search(r"(?<! al)\.\s", text)  # the first sentence ("et al." does not end one), <= 150 characters
        text = text if end is None else text[: end.start() + 1]
        lines.append(f"  {name}: {text if len(text) <= 150 else text[:147] + '...'}")
    return "\n".join(lines)


def script_help(doc: str) -> str:
    """A script's docstring, then every preset and every key."""
    return (f"{doc.strip()}\n\nPresets (preset=NAME; configs/):\n{preset_help()}\n\n"
            f"Keys (key=value; lists as [a,b], dicts as {{k: v}}):\n{config_help()}\n")
