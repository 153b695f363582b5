"""Valid values of config fields: declared beside each field in :mod:`grpo_cli.config.schema`, checked
when a run is composed.

A numeric field declares its range with ``num`` (``lr: float = num(1e-3, gt=0)``), a list of numbers
with ``nums``, a closed set of strings with ``choice``. ``check`` walks a composed config against the
dataclasses it was built from (each node remembers its own, including the option picked for
``source`` and ``algorithm``) and raises one ``UserError`` naming the first bad key, before a model
loads or a run directory exists. Relations between fields (``eval.ks`` at most ``eval.n``) are
checked where they are used.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from functools import cache
from typing import Any, Dict, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from grpo_cli.errors import UserError

RANGE, CHOICES = "range", "choices"
"""Keys of a dataclass field's ``metadata``."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid numbers of a field: each side bounded strictly (gt/lt), inclusively (ge/le) or not
    at all (None). NaN and infinities are never valid: no field means anything by them."""

    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None

    def __contains__(self, x: object) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )

    def describe(self, what: str) -> str:
        """``what`` ("a number", "integers") with the bounds: ``a number > 0``, ``numbers in [0, 1)``."""
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge) if self.ge is not None else None
        high = (")", self.lt) if self.lt is not None else ("]", self.le) if self.le is not None else None
        if low and high:
            return f"{what} in {low[0]}{_fmt(low[1])}, {_fmt(high[1])}{high[0]}"
        if low:
            return f"{what} {'>' if low[0] == '(' else '>='} {_fmt(low[1])}"
        if high:
            return f"{what} {'<' if high[0] == ')' else '<='} {_fmt(high[1])}"
        return {"a number": "a finite number", "numbers": "finite numbers"}.get(what, what)


def _fmt(bound: float) -> str:
    """``1`` rather than ``1.0``: bounds read as the user would write them."""
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def num(
    default: Optional[float],
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    lt: Optional[float] = None,
    le: Optional[float] = None,
) -> Any:
    """A numeric field with its valid range (None, for an Optional field, is always valid)."""
    return dataclasses.field(default=default, metadata={RANGE: Range(gt=gt, ge=ge, lt=lt, le=le)})


def nums(
    default: Optional[Sequence[float]],
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    lt: Optional[float] = None,
    le: Optional[float] = None,
) -> Any:
    """A list field whose every entry must lie in the range (an Optional one may default to None)."""
    metadata = {RANGE: Range(gt=gt, ge=ge, lt=lt, le=le)}
    if default is None:
        return dataclasses.field(default=None, metadata=metadata)
    values = list(default)
    return dataclasses.field(default_factory=lambda: list(values), metadata=metadata)


def choice(default: str, among: Iterable[str]) -> Any:
    """A string field that must be one of ``among``."""
    options = tuple(among)
    assert default in options, f"default {default!r} is not among {options}"
    return dataclasses.field(default=default, metadata={CHOICES: options})


def check(cfg: DictConfig, prefix: str = "") -> None:
    """Raise ``UserError("config key 'K': expected ..., got V")`` for the first field of ``cfg`` (and of
    its sub-configs) outside its declared range or choices."""
    schema = OmegaConf.get_type(cfg)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for name in cfg:
        key, value = f"{prefix}{name}", cfg[name]
        if isinstance(value, DictConfig):
            check(value, f"{key}.")
        elif name in fields:
            problem = _problem(value, fields[name], _hints(schema)[name])
            if problem:
                raise UserError(f"config key '{key}': {problem}")


def _boolean_spelling(value: Any, choices: Sequence[str]) -> bool:
    """``true``/``false`` among the choices: Hydra reads them as booleans and a text field stores
    ``True``/``False``, which mean the same."""
    return str(value) in ("True", "False") and str(value).lower() in choices


def _problem(value: Any, field: dataclasses.Field, hint: Any) -> Optional[str]:
    """What is wrong with ``value`` for ``field``, or None."""
    choices, bounds = field.metadata.get(CHOICES), field.metadata.get(RANGE)
    if value is None:  # only an Optional field can hold None: OmegaConf checked that
        return None
    if choices is not None and value not in choices and not _boolean_spelling(value, choices):
        return f"expected {_either(choices)}, got '{value}'"
    if bounds is None:
        return None
    integer = _number_type(hint) is int
    if isinstance(value, (ListConfig, list)):
        values = list(value)
        if all(v in bounds for v in values):
            return None
        return f"expected {bounds.describe('integers' if integer else 'numbers')}, got {values}"
    if value in bounds:
        return None
    return f"expected {bounds.describe('an integer' if integer else 'a number')}, got {value}"


def _either(options: Sequence[str]) -> str:
    """``a or b``, ``a, b or c``."""
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


@cache
def _hints(schema: type) -> Dict[str, Any]:
    return typing.get_type_hints(schema)


def _number_type(hint: Any) -> Optional[type]:
    """``int`` or ``float`` for int, float, Optional[...] and List[...] of them; else None."""
    if hint in (int, float):
        return hint
    found: List[type] = [t for t in map(_number_type, typing.get_args(hint)) if t is not None]
    return found[0] if found else None
