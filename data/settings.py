"""How a run setting is declared, once: a dataclass field whose metadata holds its help,
allowed values, check and the strategies that use it.

Settings live in the layer that uses them (the data spec here, the clients' task in
`clients.task`, the server's in `server.settings`), nested into one `RunSettings`. Every
door (the `fedfuse run` flags, a grid file, Flower's run config, the clients' message)
is derived from these fields through the functions below, so a new setting is one field.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterator


class SettingsError(ValueError):
    """A setting that cannot work; the message names the setting and the fix."""


@dataclass(frozen=True)
class Check:
    """A rule a value must follow; `phrase` completes "--name ...", e.g. "must be > 0"."""

    holds: Callable[[Any], bool]
    phrase: str


def whole(low: int, phrase: str | None = None) -> Check:
    return Check(lambda v: int(v) == v and v >= low,
                 phrase or ("must be a positive whole number" if low == 1 else f"must be a whole number >= {low}"))


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
           phrase: str | None = None) -> Check:
    def holds(v) -> bool:
        return (math.isfinite(v) or high == math.inf and v == math.inf) and (low < v if low_open else low <= v) \
            and (v < high if high_open else v <= high)

    default = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Check(holds, phrase or default)


def setting(default, help: str, *, choices: tuple | Callable[[], tuple] | None = None, check: Check | None = None,
            strategies: tuple[str, ...] = (), flwr: bool = True) -> Any:
    """A user setting. `choices` may be a function (a registry read when checked);
    `strategies`: the strategies it matters to (all when empty); `flwr=False`: not a key
    of `flwr run .`'s config (Ray resources come from Flower's federation config there)."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check,
                                            "strategies": strategies, "flwr": flwr})


def internal(default) -> Any:
    """Set by the server per round (not a user setting), sent to the clients with the task."""
    return field(default=default, metadata={"internal": True})


def nested(cls) -> Any:
    return field(default_factory=cls)


def _is_nested(f) -> bool:
    return f.default_factory is not MISSING and is_dataclass(f.default_factory)


def declared(cls, internal_too: bool = False) -> Iterator[tuple[str, Any, type]]:
    """(name, field, owning dataclass) for every setting of `cls`, nested ones in place."""
    for f in fields(cls):
        if _is_nested(f):
            yield from declared(f.default_factory, internal_too)
        elif internal_too or not f.metadata.get("internal"):
            yield f.name, f, cls


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices_of(f) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def from_flat(cls, values, strict: bool = True, internal_too: bool = False):
    """An instance of `cls` (nested dataclasses filled in) from a flat mapping with
    kebab- or snake-case keys. Values are type-checked (a whole number is accepted
    for a float); `strict` refuses unknown keys, otherwise they are ignored (a client's
    message carries more than its task)."""
    known = {name: f for name, f, _ in declared(cls, internal_too)}
    flat = {}
    for key, value in dict(values).items():
        name = key.replace("-", "_")
        if name not in known:
            if strict:
                raise SettingsError(f"unknown setting '{key}'")
            continue
        flat[name] = _typed(name, value, type(known[name].default))
    return _build(cls, flat, internal_too)


def _typed(name: str, value, expected: type):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise SettingsError(f"{flag(name)} must be {expected.__name__}, got {value!r}")
    return value


def _build(cls, flat: dict, internal_too: bool):
    kwargs = {}
    for f in fields(cls):
        if _is_nested(f):
            kwargs[f.name] = _build(f.default_factory, flat, internal_too)
        elif f.name in flat and (internal_too or not f.metadata.get("internal")):
            kwargs[f.name] = flat[f.name]
    return cls(**kwargs)


def to_flat(obj, internal_too: bool = False) -> dict:
    """The settings of a (nested) dataclass instance as one flat snake-case dict."""
    values = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if _is_nested(f):
            values.update(to_flat(value, internal_too))
        elif internal_too or not f.metadata.get("internal"):
            values[f.name] = value
    return values


def check_values(obj) -> None:
    """Each setting's own rule: its allowed values and its check. Rules that tie several
    settings together belong to the owner's `validate`."""
    values = to_flat(obj)
    for name, f, _ in declared(type(obj)):
        value = values[name]
        choices = choices_of(f)
        if choices is not None and value not in choices:
            raise SettingsError(f"{flag(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        check = f.metadata.get("check")
        if check is not None and not check.holds(value):
            raise SettingsError(f"{flag(name)} {check.phrase}, got {value!r}")
