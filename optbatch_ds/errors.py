"""The error boundary: mistakes a user can fix versus bugs.

`cli.run_main` catches `UserError` (and its subclasses) only: it prints the message as one
`error: ...` line and exits with code 2. Anything else is a bug or an environment failure (out of
memory, a dead rank) and keeps its traceback. Raise a `UserError` subclass only where the message
tells the user what to change: a config key, a flag, a file and line, a checkpoint path.
"""
from __future__ import annotations

import difflib


class UserError(ValueError):
    """Something the user can fix; the message names the key, flag, file or record and the fix."""


class ConfigError(UserError):
    """A configuration a run cannot start with (a flag, a DeepSpeed JSON key, an "optbatch" key, a model path)."""


class ResumeError(UserError, FileNotFoundError):
    """`--resume` names no complete checkpoint, or a checkpoint that cannot be loaded."""


def closest(name: str, valid, cutoff: float = 0.5) -> str | None:
    """The valid name most like `name`, or None: the one nearest-name rule. A valid name that `name` extends
    with a suffix ("strata_count" -> "strata", "--epochs-total" -> "--epochs") wins, the longest such;
    otherwise the closest by difflib ratio, if at least `cutoff`."""
    name, names = str(name), [str(v) for v in valid]
    stems = [v for v in names if len(v) >= 3 and len(name) > len(v) and name.startswith(v) and name[len(v)] in "_-."]
    if stems:
        return max(stems, key=len)
    close = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
    return close[0] if close else None


def nearest_name(name: str, valid, cutoff: float = 0.5) -> str:
    """'; did you mean 'x'?' for the closest valid name, else '; valid: a, b, c' (to end an error message)."""
    close = closest(name, valid, cutoff)
    return f"; did you mean '{close}'?" if close else f"; valid: {', '.join(sorted(str(v) for v in valid))}"
