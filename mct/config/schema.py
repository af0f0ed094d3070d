"""The config schema's machinery: nested dicts <-> frozen dataclasses, with unknown keys named.

Every section of a run's config is a frozen dataclass; `build` makes one from a nested dict (a ConfigDict's
`to_dict()` or a checkpoint's saved config), naming the first unknown key with a suggestion; `require` and
`check_finite` are the checks every section's validation shares.
"""

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from mct.errors import ConfigError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(f"config {message}")


def check_finite(values: Any, key: str = "") -> None:
    """Raises ConfigError naming the first NaN or infinite float of a config's `to_dict()`: a NaN fails every
    comparison, so a `not x < 0` check lets it through, and no setting means an infinite lr or weight."""
    if isinstance(values, dict):
        for name, value in values.items():
            check_finite(value, f"{key}.{name}" if key else name)
    elif isinstance(values, list):
        for i, value in enumerate(values):
            check_finite(value, f"{key}[{i}]")
    else:
        require(not isinstance(values, float) or math.isfinite(values), f"{key}={values} must be finite")


def build(cls: type, values: Any, path: str = "") -> Any:
    """An instance of dataclass `cls` from a nested dict, naming the first unknown key with a suggestion."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"config {path.rstrip('.') or 'root'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {path}{near[0]}?)" if near else ""
            raise ConfigError(f"unknown config key {path}{key}{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _build_value(hints[key], value, f"{path}{key}") for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config {path.rstrip('.') or 'root'}: {e}") from None


def _build_value(hint: Any, value: Any, path: str) -> Any:
    """value converted to the field type `hint`: nested dataclasses, tuples, mixture dicts, numbers."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path + ".")
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config {path} must be a list, got {value!r}")
        return tuple(value)
    if origin is dict:
        item = typing.get_args(hint)[1]
        return {k: build(item, v, f"{path}.{k}.") for k, v in dict(value).items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        hint in (int, float, str, bool)
        and not isinstance(value, hint)
        or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"config {path} must be {hint.__name__}, got {value!r}")
    return value


def to_dict(value: Any) -> Any:
    """A dataclass tree as plain dicts and lists (JSON-able)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict | types.MappingProxyType):
        return {k: to_dict(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_dict(v) for v in value]
    return value
