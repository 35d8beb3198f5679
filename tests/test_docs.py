"""The docs stay true: docs/config.md lists every setting with its current default, and no
setting that is gone."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from gedi_nesy.bench.plan import BandConfig, BenchConfig
from gedi_nesy.config import GediRunConfig, NesyRunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MD = (ROOT / "docs" / "config.md").read_text()
UNCHECKED_DEFAULTS = {"name", "task", "bench.columns"}  # defaults given in words


def _shown(value: Any) -> str:
    """A default as docs/config.md writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return repr(list(value))
    return "{}" if value == {} else str(value)


def _settings(cls: type, prefix: str) -> dict[str, Any]:
    """Dotted key -> default of every setting of a config dataclass, sections flattened (an
    optional section, such as a bench's ``band``, is listed itself with default None too)."""
    found: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        optional = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if optional:
            found[key] = f.default
        section = optional[0] if optional else hint
        if dataclasses.is_dataclass(section):
            found.update(_settings(section, f"{key}."))
        else:
            found[key] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return found


# both kinds of run share their sections and defaults, so one row per key
SETTINGS = {
    **_settings(GediRunConfig, ""),
    **_settings(NesyRunConfig, ""),
    **_settings(BenchConfig, "bench."),
    **_settings(BandConfig, "bench.band."),
}


def _row(key: str) -> str:
    rows = [line for line in CONFIG_MD.splitlines() if line.startswith(f"| `{key}` |")]
    assert rows, f"docs/config.md lists no row for `{key}`"
    return rows[0]


@pytest.mark.parametrize("key", sorted(SETTINGS))
def test_every_setting_is_documented_with_its_default(key: str) -> None:
    row, default = _row(key), SETTINGS[key]
    if key in UNCHECKED_DEFAULTS:
        return
    cell = row.split("|")[2].strip()
    shown = _shown(default)
    assert cell.startswith(f"`{shown}`"), f"{key}: docs say {cell}, the default is {shown}"


def test_no_documented_setting_is_gone() -> None:
    known = set(SETTINGS)
    listed = re.findall(r"^\| `([a-z_.]+)` \|", CONFIG_MD, flags=re.M)
    assert sorted(set(listed) - known) == []
