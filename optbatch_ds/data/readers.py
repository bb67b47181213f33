"""Read raw records, each tagged with where it came from.

`iter_records(path)` yields `(source, record)` pairs for a JSON Lines, JSON array or parquet file,
told apart by content, not by suffix (`file_kind`: a JSON array saved as .jsonl is read as an array, JSON
Lines saved as .json as lines, each with a warning saying what to rename it to); a UTF-8 byte-order mark
at the start is dropped; a record that cannot even be read (a broken JSON line, bytes that are not UTF-8)
comes out as `(source, DataError)` so the caller decides whether to raise or skip it. Problems
with the whole file (missing, empty, a .json that does not parse) are raised here.

Sources are "path:LINE" for .json/.jsonl (1-based line where the record starts) and
"path:record N" (1-based) for parquet files and `datasets` datasets.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

from .errors import DataError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
BOM = b"\xef\xbb\xbf"
_KIND_SUFFIX = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet"}
_KIND_NAME = {"jsonl": "JSON Lines (one record per line)", "json": "a JSON array", "parquet": "a parquet table"}


def data_files_in(folder: str) -> list[str]:
    """The .json/.jsonl/.parquet files directly inside `folder`, sorted by name."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(DATA_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DataError(folder, None, "the folder holds no .json, .jsonl or .parquet file",
                        "a folder of data files, or one file", kind="no_records", skippable=False)
    return [os.path.join(folder, n) for n in names]


def file_kind(path: str) -> str:
    """What a data file holds, from its first bytes: "parquet" (PAR1 magic), "json" (a JSON array, or one JSON
    value spread over several lines), "jsonl" (a JSON object per line); else what its suffix says, or
    "unknown"."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.removeprefix(BOM).lstrip(b" \t\r\n")
    suffix = os.path.splitext(path)[1]
    first, _, rest = text.partition(b"\n")
    if text.startswith(b"["):  # a JSON array, unless it is the first of several lines of a .jsonl file
        return "jsonl" if suffix == ".jsonl" and rest.strip() and _is_json(first) else "json"
    if text.startswith(b"{"):
        try:
            json.loads(first)
        except ValueError:  # one JSON value over several lines (the array reader names the wrong top level), or
            try:            # JSON Lines with a broken first line (reported line by line)
                with open(path, "rb") as f:
                    json.loads(f.read().removeprefix(BOM))
                return "json"
            except ValueError:
                return "jsonl"
        whole = len(head) < (1 << 16) and not rest.strip()
        return "json" if whole and suffix == ".json" else "jsonl"  # one object on one line: as its suffix says
    return next((k for k, s in _KIND_SUFFIX.items() if s == suffix), "unknown")


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def iter_records(path: str) -> Iterator[tuple[str, object]]:
    """(source, record or DataError) for every record of a data file (see the module docstring)."""
    kind = file_kind(path)
    if kind == "unknown":
        raise DataError(path, None, "unknown file type", "a .json, .jsonl or .parquet file",
                        kind="unknown_file_type", skippable=False)
    suffix = os.path.splitext(path)[1]
    if suffix != _KIND_SUFFIX[kind]:
        logger.warning("%s holds %s although it is named %s: read as %s (rename it to *%s)", path,
                       _KIND_NAME[kind], suffix or "without a suffix", _KIND_NAME[kind], _KIND_SUFFIX[kind])
    reader = {"jsonl": _iter_jsonl, "json": _iter_json_array, "parquet": _iter_parquet}[kind]
    yield from reader(path)


def _no_records(path: str) -> DataError:
    return DataError(path, None, "no records (the file is empty)", "at least one record",
                     kind="no_records", skippable=False)


def _iter_jsonl(path: str) -> Iterator[tuple[str, object]]:
    n = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                n += 1
                yield source, DataError(
                    source, None, f"line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                    + _utf16_hint(raw if lineno == 1 else b""),
                    "UTF-8 text (re-encode the file, e.g. iconv -f latin1 -t utf-8)", kind="not_utf8")
                continue
            if not line.strip():
                continue
            n += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield source, DataError(source, None, f"line is not valid JSON: {e.msg.removesuffix(' at')} at column {e.colno}",
                                        "one JSON object per line", kind="invalid_json")
                continue
            yield source, record
    if n == 0:
        raise _no_records(path)


def _utf16_hint(start: bytes) -> str:
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        return ": it starts with a UTF-16 byte-order mark (saved as 'Unicode'); save it as UTF-8"
    return ""


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _iter_json_array(path: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        raw = f.read().removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}", None, f"file is not valid UTF-8 (byte 0x{raw[e.start]:02x})"
                        + _utf16_hint(raw),
                        "UTF-8 text (re-encode the file, e.g. iconv -f latin1 -t utf-8)",
                        kind="not_utf8", skippable=False) from None
    if not text.strip():
        raise _no_records(path)
    # Decode the array element by element so every record knows the line it starts on.
    decoder = json.JSONDecoder()
    ws = " \t\r\n"

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def broken(pos: int, msg: str) -> DataError:
        return DataError(f"{path}:{_line_of(text, pos)}", None, f"file is not valid JSON: {msg}",
                         "a JSON array of records (or a .jsonl file, one record per line)",
                         kind="invalid_json", skippable=False)

    i = skip_ws(0)
    if text[i] != "[":
        try:
            top = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (one record per line? then name the file .jsonl)" if e.msg == "Extra data" else ""
            raise broken(e.pos, f"{e.msg.removesuffix(' at')} at column {e.colno}{hint}") from None
        raise DataError(path, None, f"the top level is a JSON {_json_type(top)}",
                        "a JSON array of records (or a .jsonl file, one record per line)",
                        kind="wrong_top_level", skippable=False)
    i = skip_ws(i + 1)
    n = 0
    if i < len(text) and text[i] == "]":
        raise _no_records(path)
    while True:
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise broken(e.pos, f"{e.msg.removesuffix(' at')} at column {e.colno}") from None
        n += 1
        yield f"{path}:{_line_of(text, i)}", record
        i = skip_ws(end)
        if i >= len(text):
            raise broken(i, "the array is not closed with ']'")
        if text[i] == "]":
            if skip_ws(i + 1) < len(text):
                raise broken(skip_ws(i + 1), "extra data after the closing ']'")
            return
        if text[i] != ",":
            raise broken(i, f"expected ',' or ']' after record {n}, found {text[i]!r}")
        i = skip_ws(i + 1)


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _iter_parquet(path: str) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(path, None, f"could not read the parquet file ({type(e).__name__}: {e})",
                        "a parquet file (e.g. written by datasets.Dataset.to_parquet)",
                        kind="unreadable_file", skippable=False) from None
    if len(ds) == 0:
        raise _no_records(path)
    for i, record in enumerate(ds, start=1):
        yield f"{path}:record {i}", record


def iter_hub_records(name: str, split: str) -> Iterator[tuple[str, object]]:
    """Records of a `datasets` dataset: `datasets.load_dataset(name, split=split)`, which honours
    HF_DATASETS_OFFLINE / HF_HUB_OFFLINE (set by the tests and recommended on clusters)."""
    import datasets

    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        how = "offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)" if offline else "from the cache or the Hub"
        raise DataError(name, None, f"is not a local file or folder and could not be loaded {how} as a "
                        f"datasets dataset, split '{split}' ({type(e).__name__}: {e})",
                        "a local .json/.jsonl/.parquet file or a folder of them (pass it with --data), "
                        "or a dataset already in the datasets cache", kind="unreadable_file",
                        skippable=False) from None
    if len(ds) == 0:
        raise DataError(f"{name}[{split}]", None, "no records", "at least one record",
                        kind="no_records", skippable=False)
    for i, record in enumerate(ds, start=1):
        yield f"{name}[{split}]:record {i}", record
