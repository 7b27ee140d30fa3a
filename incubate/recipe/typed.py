"""Recipe values checked against the dataclass field types that declare them: one mechanism for
every section. Choices are `Literal[...]`, bounds are `Annotated[..., Range(...)]`, a mapping of
named sections is `Annotated[dict, Sections(...)]` and a stage's overrides of another section's keys
are `Annotated[dict, Overrides(...)]`; every refusal is one line naming the key path."""
from __future__ import annotations

import dataclasses
import difflib
import contextvars
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError

# Whether Choices rules ask their registries (importing timm): off while a run directory's own
# recipe is read (checked when it was written), so that `status` stays free of torch.
REGISTRIES: contextvars.ContextVar[bool] = contextvars.ContextVar("registries", default=True)
INT_BOUND = 2 ** 63     # torch's int64: a larger count cannot reach a tensor or a seed


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
    lt: float | None = None
    note: str = ""

    def holds(self, value) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        return f"{'<=' if self.le is not None else '<'} {high[:-1]}"

    def apply(self, value, where: str, optional: bool):
        if self.holds(value):
            return value
        notes = [n for n in (self.note, "or unset" if optional else "") if n]
        raise UserError(f"{where} must be {self.describe()}{''.join(f' ({n})' for n in notes)}, got {value}")


@dataclass(frozen=True)
class Choices:
    """A name that a registry outside this package must know (timm's optimizers, schedulers): `known(name)`
    asks it, `listing()` names some valid ones for the message. Asked only while REGISTRIES is on."""
    known: Callable[[str], bool]
    listing: Callable[[], list]
    what: str

    def apply(self, value: str, where: str, optional: bool) -> str:
        if not REGISTRIES.get() or self.known(value):
            return value
        names = self.listing()
        shown = ", ".join(names[:12]) + (f" (and {len(names) - 12} more)" if len(names) > 12 else "")
        raise UserError(f"{where} must be one of {self.what}: {shown}; got {value!r}{_suggest(value, names, '')}")


@dataclass(frozen=True)
class Items:
    """A list whose items each have type `item` (its own Range included): `length` of them exactly, or
    at least `min_len`; `ordered`: each item at least the one before."""
    item: Any
    length: int | None = None
    min_len: int = 0
    ordered: bool = False

    def apply(self, value: list, where: str, optional: bool) -> list:
        if self.length is not None and len(value) != self.length:
            raise UserError(f"{where} must be a list of {self.length} items, got {value}")
        if len(value) < self.min_len:
            raise UserError(f"{where} must be a list of at least {self.min_len} item(s), got {value}")
        out = [coerce(v, self.item, f"{where}[{i}]") for i, v in enumerate(value)]
        if self.ordered and any(b < a for a, b in zip(out, out[1:])):
            raise UserError(f"{where} must be in increasing order, got {value}")
        return out


@dataclass(frozen=True)
class Text:
    """A string that must not be empty (a name, a path, a column)."""
    note: str = ""

    def apply(self, value: str, where: str, optional: bool) -> str:
        if not value.strip():
            raise UserError(f"{where} must not be empty{' (' + self.note + ')' if self.note else ''}"
                            f"{'; leave it unset' if optional else ''}")
        return value


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


@dataclass(frozen=True)
class Plain:
    """A free-form mapping handed to another library (timm's model kwargs, submitit's parameters):
    names as keys and plain values all the way down, every number finite and within 64 bits."""

    def apply(self, value: dict, where: str, optional: bool) -> dict:
        _plain_values(value, where)
        return value


def _plain_values(value, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise UserError(f"recipe key '{where}' has the key {key!r}; keys there are names")
            _plain_values(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain_values(item, f"{where}[{i}]")
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        _plain(value, type(value), where)
    elif value is not None and not isinstance(value, bool):
        raise UserError(f"recipe key '{where}' must be a number, a string, a boolean, a list or a mapping, "
                        f"got {value!r}")


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
    """1e7 (YAML 1.1 reads it as a string), 2.0e6 or 3 as a float; None if it is not a number."""
    if isinstance(value, float):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value) if abs(value) < 2 ** 1000 else math.copysign(math.inf, value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _key(where: str) -> str:
    """How a message names the value: a command-line argument (--seed) as itself, else as a recipe key."""
    return where if where.startswith("--") else f"recipe key '{where}'"


def _within_int64(value: int, where: str) -> int:
    if not -INT_BOUND <= value < INT_BOUND:
        raise UserError(f"{_key(where)} is {value}, beyond the 64-bit integers torch computes with")
    return value


def _finite(value: float, where: str) -> float:
    """Every float of the recipe is finite: no key means anything by NaN or infinity."""
    if not math.isfinite(value):
        raise UserError(f"{_key(where)} must be a finite number, got {value}")
    return value


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
            return _within_int64(value, where)
        number = _number(value)
        if number is not None and number.is_integer():
            return _within_int64(int(number), where)
    if tp is float and not isinstance(value, bool):
        number = _number(value)
        if number is not None:
            return _finite(number, where)
    if tp is str and isinstance(value, str):
        if "\0" in value:
            raise UserError(f"recipe key '{where}' holds a NUL character; remove it")
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
