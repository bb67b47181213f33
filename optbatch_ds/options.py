"""Declaring a config key once: a dataclass field carries its default, help text and allowed values.

    @dataclass(frozen=True)
    class SelectionConfig:
        quotas: str = option("exp_loss", "How stratum quotas are drawn.", choices=("exp_loss", "uniform"))

The command line (`config.build_arg_parser`), validation (`check_choices`) and the README's tables
(tests/unit/test_config.py compares them) all read the same metadata, in the style of TRL's
`field(metadata={"help": ..., "choices": [...]})`.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, field, fields

from optbatch_ds.errors import ConfigError, nearest_name

SECTION = '"optbatch"'  # how messages name the DeepSpeed JSON section these keys live in


def option(default=MISSING, help: str = "", choices: tuple | None = None, what: str = "value"):
    """A dataclass field with its help text and, for string keys, the allowed values (`what` names such a value
    in error messages: "unknown data format 'x'")."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "what": what})


def bad(key: str, message: str, section: str = SECTION) -> ConfigError:
    """The one format of a config error: '"optbatch".key: message'."""
    return ConfigError(f"{section}.{key}: {message}")


def check_choices(obj, cls=None, section: str = SECTION) -> None:
    """Every field of `cls` (default: `obj`'s class) declared with choices holds one of them in `obj`;
    raises ConfigError naming the nearest allowed value."""
    for f in fields(cls or obj):
        allowed = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if allowed and value not in allowed:
            raise bad(f.name, f"{value!r} is not one of {', '.join(allowed)}{nearest_name(value, allowed)}", section)


def as_float(value, key: str, *, allow_inf: bool = True, section: str = SECTION) -> float:
    """A JSON number (or the strings 'inf' / 'infinity', since JSON has no infinity) as a float."""
    if isinstance(value, str) and allow_inf and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_numpy_number(value):
        expected = "a number or 'inf'" if allow_inf else "a number"
        raise bad(key, f"expected {expected}, got {value!r}", section)
    return float(value)


def as_int(value, key: str, section: str = SECTION) -> int:
    """A JSON integer as an int (2.0 is accepted, 2.5 and True are not)."""
    numeric = isinstance(value, (int, float)) or _is_numpy_number(value)
    if isinstance(value, bool) or not numeric or not float(value).is_integer():
        raise bad(key, f"expected an integer, got {value!r}", section)
    return int(value)


def _is_numpy_number(value) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def _shown(default) -> str:
    if default is None:
        return "null"
    return f"`{default}`" if isinstance(default, str) else repr(default)


def markdown_table(cls, first: tuple[str, ...] = ()) -> str:
    """The README table of a config dataclass: | `key` | default | meaning (the help text) |, the keys in
    `first` leading, the rest in declaration order. tests/unit/test_config.py checks the README holds it."""
    order = sorted(fields(cls), key=lambda f: (first.index(f.name) if f.name in first else len(first)))
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {_shown(f.default)} | {f.metadata.get('help', '')} |" for f in order]
    return "\n".join(rows)
