"""Recipe values checked against the dataclass field types that declare them: one mechanism for
every section. Choices are `Literal[...]`, bounds are `Annotated[..., Range(...)]`, a mapping of
named sections is `Annotated[dict, Sections(...)]` and a stage's overrides of another section's keys
are `Annotated[dict, Overrides(...)]`; every refusal is one line naming the key path."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any

from .errors import UserError


def _either(values) -> str:
    words = [str(v) for v in values]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def _suggest(key: str, valid, where: str) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""


@dataclass(frozen=True)
class Range:
    """Bounds of a number; `note` says what the edge values mean."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    note: str = ""

    def apply(self, value, where: str, optional: bool):
        low_ok = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        if low_ok and (self.le is None or value <= self.le):
            return value
        if self.le is None:
            bound = f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        else:
            low = f"[{self.ge}" if self.ge is not None else f"({self.gt}"
            bound = f"in {low}, {self.le}]"
        notes = [n for n in (self.note, "or unset" if optional else "") if n]
        raise UserError(f"{where} must be {bound}{''.join(f' ({n})' for n in notes)}, got {value}")


@dataclass(frozen=True)
class Sections:
    """A mapping of named sections of one dataclass; only the names in `names` (called `word`s)."""
    cls: type
    names: tuple
    word: str = "stage"

    def apply(self, value: dict, where: str, optional: bool) -> dict:
        out = {}
        for name, section in value.items():
            if name not in self.names:
                raise UserError(f"unknown {self.word} '{where}.{name}'; valid {self.word}s: "
                                f"{', '.join(self.names)}")
            out[name] = coerce(section, self.cls, f"{where}.{name}")
        return out


@dataclass(frozen=True)
class Overrides:
    """A stage's overrides of the keys of `cls`, each checked as that key is under `cls`."""
    cls: type

    def apply(self, value: dict, where: str, optional: bool) -> dict:
        hints = field_types(self.cls)
        out = {}
        for key, item in value.items():
            _known(key, hints, where)
            out[key] = coerce(item, hints[key], f"{where}.{key}")
        return out


def field_types(cls) -> dict:
    """Field name -> declared type (metadata kept), in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _known(key, hints: dict, where: str) -> None:
    if key not in hints:
        raise UserError(f"unknown recipe key '{where + '.' if where else ''}{key}'; valid keys"
                        f"{' under ' + where if where else ''}: {', '.join(hints)}{_suggest(key, hints, where)}")


def build(cls, values: dict, where: str = ""):
    """An instance of dataclass `cls` from a mapping of (some of) its fields, each value checked."""
    hints = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        _known(key, hints, where)
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}" if where else str(key))
    return cls(**kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _number(value) -> float | None:
    """1e7 (YAML 1.1 reads it as a string) or 2.0e6 as a float; None if it is not a number."""
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _plain(value: Any, tp, where: str):
    """`value` as the plain type `tp` (bool, int, float, str, list, dict, a dataclass)."""
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "shorthand", None)
        if shorthand and isinstance(value, str):
            value = {shorthand: value}          # e.g. `data: digits`
        if not isinstance(value, dict):
            raise UserError(f"recipe key '{where}' must be a mapping, got {value!r}")
        return build(tp, value, where)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
    if tp is float and not isinstance(value, bool):
        number = float(value) if isinstance(value, int) else _number(value)
        if number is not None:
            return number
    if tp is str and isinstance(value, str):
        return value
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp is dict and isinstance(value, dict):
        return dict(value)
    raise UserError(f"recipe key '{where}' must be of type {_type_name(tp)}, got {value!r}; "
                    f"fix the recipe or the --set value")


def coerce(value: Any, tp, where: str, optional: bool = False):
    """`value` checked (and converted where YAML reads it loosely) as declared type `tp`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return coerce(value, inner, where, optional=True)
    if origin is typing.Annotated:
        base, *rules = typing.get_args(tp)
        value = coerce(value, base, where, optional)
        for rule in rules:
            value = rule.apply(value, where, optional)
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{where} must be {_either(typing.get_args(tp))}, got {value!r}")
        return value
    return _plain(value, origin or tp, where)
