"""Bad-input errors and the skip report.

Every problem with the data is a `DataError` whose message a user can act on: the file and
line (or record), the field, what was found, what was expected, and how to skip such records.
With `on_bad_record="skip"` the same error is recorded in a `SkipReport` instead of raised, so
nothing is dropped silently: the report is counted, logged and written next to the run.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from optbatch_ds.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

ON_BAD_RECORD = ("error", "skip")

_SKIP_HINT = "fix the record, or pass --on-bad-record skip to skip bad records (they are counted in the skip report)"


class DataError(UserError):
    """A problem with one record (or one whole file) of the training data.

    `kind` is a short stable code (e.g. "invalid_json", "missing_field") used to count problems in
    the skip report. `skippable=False` marks file-level problems (empty file, a .json file that
    does not parse): skipping cannot help there, so the message does not suggest it and
    `on_bad_record="skip"` still raises.
    """

    def __init__(self, source: str, field: str | None, problem: str, expected: str | None = None,
                 *, kind: str = "invalid_record", skippable: bool = True):
        self.source = source
        self.field = field
        self.problem = problem
        self.expected = expected
        self.kind = kind
        self.skippable = skippable
        parts = [f"{source}:"]
        if field is not None:
            parts.append(f"field '{field}':")
        parts.append(problem)
        msg = " ".join(parts)
        if expected:
            msg += f"; expected {expected}"
        if skippable:
            msg += f". To go on: {_SKIP_HINT}"
        super().__init__(msg)

    def as_dict(self) -> dict:
        return {"source": self.source, "field": self.field, "problem": self.problem, "kind": self.kind}


@dataclass
class SkipReport:
    """What was skipped (one entry per record) and what was kept but altered (counts only).

    `skipped` entries are {"source", "field", "problem", "kind"}; `events` counts things that
    changed a kept sample without dropping it (e.g. "truncated").
    """

    skipped: list[dict] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)

    def add(self, err: DataError) -> None:
        self.skipped.append(err.as_dict())

    def count(self) -> int:
        return len(self.skipped)

    def note(self, event: str, n: int = 1) -> None:
        self.events[event] += n

    def by_problem(self) -> dict[str, int]:
        return dict(sorted(Counter(s["kind"] for s in self.skipped).items()))

    def summary(self) -> str:
        parts = [f"{self.count()} records skipped"]
        if self.skipped:
            parts.append("(" + ", ".join(f"{k}: {v}" for k, v in self.by_problem().items()) + ")")
        if self.events:
            parts.append("; kept but " + ", ".join(f"{k}: {v}" for k, v in sorted(self.events.items())))
        return " ".join(parts)

    def write(self, path) -> None:
        """Write the report as JSON: count, per-problem counts, events, and every skipped record."""
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        doc = {"count": self.count(), "by_problem": self.by_problem(),
               "events": dict(sorted(self.events.items())), "skipped": self.skipped}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")


def check_on_bad_record(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD:
        raise ConfigError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")


def handle(err: DataError, on_bad_record: str, report: SkipReport) -> None:
    """Raise `err`, or record it in `report` when skipping is asked for and possible."""
    if on_bad_record == "skip" and err.skippable:
        report.add(err)
        logger.debug("skipped: %s", err)
        return
    raise err
