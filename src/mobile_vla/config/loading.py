"""Loading configs: dict <-> dataclass with the key named in every error, YAML files with
``parent:`` inheritance, dotted overrides, and the resolved config written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from mobile_vla.config.schema import Config, T, bad_value
from mobile_vla.errors import ConfigError
from mobile_vla.io import atomic_write_text

# --------------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------------


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(tp: Any, value: Any, key: str, source: str = "") -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad_value(key, "a mapping", value)
        return from_dict(tp, value, key, source)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _convert(arg, value, key, source)
            except ConfigError:
                continue
        raise bad_value(key, _type_name(tp), value)
    if origin is Literal:
        # a number written where a name is expected (--trainer.precision=32 reads as 32)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and str(value) in get_args(tp):
            value = str(value)
        if value not in get_args(tp):
            raise bad_value(key, _type_name(tp), value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad_value(key, _type_name(tp), value)
        (arg,) = get_args(tp)[:1] or (Any,)
        return [_convert(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad_value(key, "a mapping", value)
        _, varg = get_args(tp) or (str, Any)
        return {str(k): _convert(varg, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise bad_value(key, "null", value)
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad_value(key, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_value(key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_value(key, "a number", value)
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `devices: 2` as a number
        if not isinstance(value, str):
            raise bad_value(key, "a string", value)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # programming error


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key_error(key: str, valid: Iterable[str], prefix: str, source: str = "") -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
    where = f" in {source}" if source else ""
    return ConfigError(
        f"config key '{_join(prefix, key)}' is not known{where}{hint}; "
        f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(valid))}"
    )


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(str(key), fields, prefix, source)
        kwargs[key] = _convert(fields[key], value, _join(prefix, key), source)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# YAML files, inheritance, overrides
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and everything it inherits through ``parent:`` (child keys win)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"config '{path}' inherits from itself: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    if path.suffix.lower() == ".json":
        from mobile_vla.robovlms import load_robovlms

        imported = load_robovlms(path)
        if imported.ignored:
            logging.getLogger(__name__).warning(
                "%s: %d RoboVLMs key(s) with no meaning here, not used (the reasons: "
                "mobile-vla import-config %s): %s",
                path,
                len(imported.ignored),
                path,
                ", ".join(entry.split(" (", 1)[0] for entry in imported.ignored),
            )
        for note in imported.notes:
            logging.getLogger(__name__).info("%s: %s", path, note)
        return imported.tree
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    parents = raw.pop("parent", None)
    if parents is None:
        return raw
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"config key 'parent' in '{path}' must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
        merged = _deep_merge(merged, read_yaml_tree(parent_path, (*_seen, resolved)))
    return _deep_merge(merged, raw)


def parse_override(text: str) -> tuple[str, Any]:
    """``"--data.window_size=4"`` -> ``("data.window_size", 4)``; values are parsed as YAML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(
            f"override '{text}' must have the form key=value (e.g. data.window_size=4)"
        )
    key, value = body.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML") from exc
    return key, parsed


def _apply_override(tree: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node = tree
    current_cls: Any = cls
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(current_cls):
            raise ConfigError(f"override '{key}': '{prefix}' is not a section")
        fields = _fields(current_cls)
        if part not in fields:
            raise unknown_key_error(part, fields, prefix, "the command line")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
            current_cls = fields[part]


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    cls: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Load ``path`` (with its parents), apply dotted overrides, validate, and return ``cls``."""
    tree: dict[str, Any] = read_yaml_tree(path) if path is not None else {}
    source = str(path) if path is not None else ""
    # Validate file keys before overrides so errors name the file.
    from_dict(cls, tree, source=source)
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(tree, key, value, cls)
    cfg = from_dict(cls, tree, source=source)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) atomically."""
    atomic_write_text(path, config_to_yaml(cfg))
