"""Typed configs from YAML: ``extends:`` chains, ``--set`` overrides, and strict conversion into
the config dataclasses of :mod:`gedi_nesy.config` (an unknown key or a value of the wrong type
is a one-line :class:`~gedi_nesy.errors.ConfigError` naming the key).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from gedi_nesy.errors import ConfigError

__all__ = ["from_dict", "load_config", "to_dict", "with_defaults"]

C = TypeVar("C")


def load_config(path: str | Path | None, cls: type[C], overrides: list[str] | None = None) -> C:
    """Read a YAML file into the dataclass ``cls``, then apply ``key.sub=value`` overrides.

    A mapping anywhere in the file (the top level, a section, a bench method) may name another
    YAML file with ``extends: other.yaml``, relative to the file that says it: that file's
    mapping (with its own ``extends`` resolved, so chains work) is the starting point, and the
    mapping's other keys are deep-merged over it (mappings merge key by key, any other value
    replaces). Overrides apply after every ``extends``.

    Args:
        path: YAML file, or None for the defaults.
        cls: the top-level config dataclass, e.g. :class:`GediRunConfig`.
        overrides: strings ``a.b=value``; each value is parsed as YAML (``true``, ``[1, 2]``).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: the file (or one it extends) is missing or not a mapping, ``extends`` makes
            a cycle, a key is unknown, or a value has the wrong type.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(cls, raw, prefix="")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a YAML file with every ``extends`` in it resolved.

    Args:
        path: the file.
        chain: the files whose ``extends`` led here, outermost first (for errors and cycles).
    """
    via = f" (extended by {chain[-1]})" if chain else ""
    if not path.is_file():
        fix = "fix the extends path" if chain else "pass a YAML file, e.g. configs/*.yaml"
        raise ConfigError(f"config file {path}{via} does not exist; {fix}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file {path}{via}{where} is not valid YAML; fix the syntax"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path}{via} must hold a mapping of sections, got {type(raw).__name__}"
        )
    return _resolve_extends(raw, path, (*chain, path))


def _resolve_extends(node: Any, path: Path, chain: tuple[Path, ...]) -> Any:
    """``node`` with each mapping's ``extends: FILE`` replaced by FILE's mapping (relative to
    ``path``, the file being read) with the mapping's other keys deep-merged over it."""
    if not isinstance(node, dict):
        return node
    node = {key: _resolve_extends(value, path, chain) for key, value in node.items()}
    if "extends" not in node:
        return node
    target = node.pop("extends")
    if not isinstance(target, str) or not target:
        raise ConfigError(
            f"config file {path}: extends = {target!r}; give one YAML file, relative to "
            f"{path.parent}, e.g. extends: recipes/dpl.yaml"
        )
    parent = path.parent / target
    if any(parent.resolve() == seen.resolve() for seen in chain):
        cycle = " -> ".join(str(p) for p in (*chain, parent))
        raise ConfigError(f"config file {path}: extends makes a cycle ({cycle}); remove one")
    return _deep_merge(_read_yaml(parent, chain), node)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys merged in: two mappings merge key by key, else ``over``'s
    value replaces; new keys come after ``base``'s."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not of the form key.sub=value, e.g. optim.lr=0.001"
        )
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def from_dict(cls: type[C], raw: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {raw!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _convert(value, hints[name], f"{prefix}{name}")
    return cls(**values)


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key {key} = {value!r} is not allowed; use one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"config key {key} = {value!r} must be a list of {len(args)} values")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} = {value!r} must be a mapping of keys")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} = {value!r} must be a list")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    return _scalar(value, hint, key)


def _scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _is_float(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is Any:
        return value
    raise ConfigError(
        f"config key {key} = {value!r} ({type(value).__name__}) must be of type "
        f"{getattr(hint, '__name__', hint)}; fix the value in the YAML file or the --set override"
    )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (tuples as lists), for YAML/JSON output."""
    return _plain(dataclasses.asdict(cfg))


def with_defaults(cls: type[C], raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config (plain dicts) read through the schema of ``cls`` and written out again:
    settings added since it was saved take their defaults, which keep the earlier behaviour, so
    it compares equal to a current config that leaves them unset.

    Raises:
        ConfigError: a key the schema no longer has, or a value of the wrong type.
    """
    return to_dict(from_dict(cls, raw))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x
