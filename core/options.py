"""Stage options: a dataclass per stage is its config schema and its docs.

`build_options` turns a TOML table into an instance of the stage's options
dataclass, checking every key and value and naming the TOML path of the
first problem. Field metadata `help` is the one-line documentation shown by
`tcpstates plugins`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Sequence

from tcpstates.errors import ConfigError
from tcpstates.text import escape_text


@dataclasses.dataclass
class NoOptions:
    """For stages without options."""


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None,
           min: float | None = None, max: float | None = None, **kw: Any) -> Any:
    """A stage option: a dataclass field with its help, and the values it accepts.

    `choices` lists the allowed values (of a string option, or of each item of
    a list option); `min`/`max` bound a number (or each number of a list),
    inclusive. Numbers are always finite: NaN and infinities are refused for
    every float option. `tcpstates plugins` shows all of it.
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "min": min, "max": max, **kw}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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


class _WrongType(ConfigError):
    """The value is not of the option's type at all (as opposed to a value of
    the right type that is refused, such as NaN for a number)."""


def _check(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _check(alt, value, path)
            except _WrongType:
                continue
            # any other refusal: the value has this alternative's type but is
            # bad (NaN for `float | None`): say that, not "expected a number or
            # nothing, got a number"
        raise _WrongType(path, f"expected {_type_name(tp)}, got {_value_name(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise _WrongType(path, f"expected {_type_name(tp)}, got {_value_name(value)}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_check(inner, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:   # an integer too big for a float
                raise ConfigError(path, f"{value} is out of range") from None
            if not math.isfinite(number):
                raise ConfigError(path, f"expected a finite number, got {number}")
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is str:
        if isinstance(value, str):
            # NUL cannot be in a path or name; other control characters in an
            # option are a typo or an attack (they would reach file names,
            # journal fields, messages): every character escape_text would
            # change is refused, C1 controls (\x9b is a terminal's CSI) and
            # bidi overrides included, not only C0 and DEL
            if not value.isprintable():
                bad = next(ch for ch in value if not ch.isprintable())
                raise ConfigError(path, f"contains the control character {escape_text(bad)}; "
                                  f"give plain text")
            return value
    elif isinstance(value, tp):
        return value
    raise _WrongType(path, f"expected {_type_name(tp)}, got {_value_name(value)}")


def _check_bounds(field: dataclasses.Field, value: Any, path: str) -> None:
    """The schema's `choices`, `min` and `max` for one value (each item of a list)."""
    meta = field.metadata
    choices, low, high = meta.get("choices"), meta.get("min"), meta.get("max")
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        if choices is not None and item not in choices:
            raise ConfigError(where, f"expected one of {', '.join(map(str, choices))}, got {item!r}")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if low is not None and item < low:
                raise ConfigError(where, f"expected at least {_num(low)}, got {_num(item)}")
            if high is not None and item > high:
                raise ConfigError(where, f"expected at most {_num(high)}, got {_num(item)}")


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e18 else str(x)


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
        _check_bounds(known[key], values[key], where)
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
        row = {"name": f.name, "type": _type_name(hints[f.name]), "default": default,
               "help": f.metadata.get("help", "")}
        for key in ("choices", "min", "max"):
            if f.metadata.get(key) is not None:
                row[key] = list(f.metadata[key]) if key == "choices" else f.metadata[key]
        out.append(row)
    return out
