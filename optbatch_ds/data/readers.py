"""Read raw records, each tagged with where it came from.

`iter_records(path)` yields `(source, record)` pairs for a .jsonl, .json (top-level array) or
.parquet file; a record that cannot even be read (a broken JSON line, bytes that are not UTF-8)
comes out as `(source, DataError)` so the caller decides whether to raise or skip it. Problems
with the whole file (missing, empty, a .json that does not parse) are raised here.

Sources are "path:LINE" for .json/.jsonl (1-based line where the record starts) and
"path:record N" (1-based) for parquet files and `datasets` datasets.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

from .errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def data_files_in(folder: str) -> list[str]:
    """The .json/.jsonl/.parquet files directly inside `folder`, sorted by name."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(DATA_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DataError(folder, None, "the folder holds no .json, .jsonl or .parquet file",
                        "a folder of data files, or one file", kind="no_records", skippable=False)
    return [os.path.join(folder, n) for n in names]


def iter_records(path: str) -> Iterator[tuple[str, object]]:
    if path.endswith(".jsonl"):
        yield from _iter_jsonl(path)
    elif path.endswith(".json"):
        yield from _iter_json_array(path)
    elif path.endswith(".parquet"):
        yield from _iter_parquet(path)
    else:
        raise DataError(path, None, "unknown file type", "a .json, .jsonl or .parquet file",
                        kind="unknown_file_type", skippable=False)


def _no_records(path: str) -> DataError:
    return DataError(path, None, "no records (the file is empty)", "at least one record",
                     kind="no_records", skippable=False)


def _iter_jsonl(path: str) -> Iterator[tuple[str, object]]:
    n = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                n += 1
                yield source, DataError(
                    source, None, f"line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
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


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _iter_json_array(path: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}", None, f"file is not valid UTF-8 (byte 0x{raw[e.start]:02x})",
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
