"""Stage options: a dataclass per stage is its config schema and its docs.

`build_options` turns a TOML table into an instance of the stage's options
dataclass, checking every key and value and naming the TOML path of the
first problem. Field metadata `help` is the one-line documentation shown by
`tcpstates plugins`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from tcpstates.errors import ConfigError


@dataclasses.dataclass
class NoOptions:
    """For stages without options."""


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults handled)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "nothing", dict: "a table"}.get(tp, getattr(tp, "__name__", str(tp)))


def _value_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _check(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _check(alt, value, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"expected {_type_name(tp)}, got {_value_name(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {_value_name(value)}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_check(inner, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {_value_name(value)}")


def option_fields(options_cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(options_cls) if f.init]


def build_options(options_cls: type, table: dict[str, Any], path: str) -> Any:
    """Validate `table` against `options_cls`; unknown keys are errors."""
    hints = typing.get_type_hints(options_cls)
    known = {f.name: f for f in option_fields(options_cls)}
    values = {}
    for key, value in table.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            choices = ", ".join(sorted(known)) or "none"
            raise ConfigError(where, f"unknown option (valid options: {choices})")
        values[key] = _check(hints[key], value, where)
    try:
        instance = options_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, str(exc)) from None
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from None
    return instance


def describe_options(options_cls: type) -> list[dict[str, Any]]:
    """Name, type, default and help of each option, for `tcpstates plugins`."""
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in option_fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                    "help": f.metadata.get("help", "")})
    return out
