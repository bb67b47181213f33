"""Tokenize once: the per-record encoder (`chat.encode_example`) run inside `datasets.Dataset.map`, its result an
Arrow file reused by every rank, every restart and every Slurm requeue.

    table = encode_cached(examples, tokenizer, max_seq_len, "skip", report, cache_dir=".optbatch_cache/tokenized")
    table[i]            # an Encoded (input_ids, labels, n_supervised, truncated, source, task, index) or None
    table.usable()      # indices with a supervised token: the sampler's range

The cache key (`fingerprint`) is a hash of what decides the tokens: every example's messages, tools, untrained
turns, task and source, the tokenizer (its vocabulary and merges, special tokens, chat template), max_seq_len and
the source code of the encoder, the mask rules and the templates. `map` is given that key as its fingerprint and a
cache file named by it, so a second start finds the file and reads it instead of tokenizing (memory-mapped: ranks
on a node share the pages). The first local rank of each node writes it while the others wait
(`session.prepare_data_and_model`). Token ids and labels are int32 columns: 8 bytes a token, against ~70 for the
Python lists they replace.
"""
from __future__ import annotations

import glob
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from . import chat, masks, templates
from .chat import Encoded, encode_example
from .errors import DataError, SkipReport, check_on_bad_record, handle

logger = logging.getLogger(__name__)

_COLUMNS = ("input_ids", "labels", "n_supervised", "truncated", "source", "task", "index")


def _hash_tokenizer(h, tokenizer) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(type(tokenizer).__name__.encode())
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(json.dumps([str(t) for t in getattr(tokenizer, "all_special_tokens", [])]).encode())
    h.update(chat.chat_template_of(tokenizer).encode())


def fingerprint(examples: list, tokenizer, max_seq_len: int) -> str:
    """A hex key of everything that decides the encoded tokens (see the module docstring); ~1 s per 100k records."""
    h = hashlib.sha256()
    for module in (chat, masks, templates):  # a changed encoder or mask rule invalidates every cache
        h.update(inspect.getsource(module).encode())
    h.update(str(int(max_seq_len)).encode())
    _hash_tokenizer(h, tokenizer)
    for ex in examples:
        h.update(json.dumps([ex.messages, ex.task, ex.source, ex.tools, sorted(ex.untrained)], ensure_ascii=False,
                            sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


class EncodedTable(Sequence):
    """The encoded examples as Arrow columns: `table[i]` is the `Encoded` of example i (None when it has no
    supervised token left and was skipped), built on access; `len`, iteration and slicing as a list."""

    def __init__(self, dataset):
        self.dataset = dataset  # a datasets.Dataset with the columns of _COLUMNS
        self._n_supervised = np.asarray(dataset["n_supervised"]) if len(dataset) else np.zeros(0, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._n_supervised[i] == 0:
            return None
        row = self.dataset[int(i)]
        return Encoded(input_ids=row["input_ids"], labels=row["labels"], n_supervised=int(row["n_supervised"]),
                       truncated=bool(row["truncated"]), source=row["source"], task=row["task"], index=int(row["index"]))

    def usable(self) -> list[int]:
        """Indices of the examples with at least one supervised token."""
        return np.flatnonzero(self._n_supervised > 0).tolist()

    @property
    def cache_files(self) -> list[str]:
        return [f["filename"] for f in self.dataset.cache_files]


def _encode_batch(batch: dict, examples: list, tokenizer, max_seq_len: int) -> dict:
    """datasets.map function: encode the examples whose positions are in batch["i"] (one row each)."""
    out = {k: [] for k in _COLUMNS}
    for i in batch["i"]:
        enc = encode_example(examples[i], tokenizer, max_seq_len)
        for key in _COLUMNS[:-1]:
            out[key].append(getattr(enc, key))
        out["index"].append(int(i))
    return out


def _features():
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, "n_supervised": datasets.Value("int32"),
                              "truncated": datasets.Value("bool"), "source": datasets.Value("string"),
                              "task": datasets.Value("string"), "index": datasets.Value("int64")})


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"encoded_{key}.arrow")


def is_cached(cache_dir: str, key: str) -> bool:
    """Whether `map` will find a finished cache file for `key` (one file, or num_proc shards)."""
    stem = cache_path(cache_dir, key)[:-len(".arrow")]
    return os.path.exists(stem + ".arrow") or bool(glob.glob(stem + "_*_of_*.arrow"))


def encode_cached(examples: list, tokenizer, max_seq_len: int, on_bad_record: str, report: SkipReport,
                  cache_dir: str, num_proc: int | None = None) -> EncodedTable:
    """`chat.encode_examples`, through `datasets.map` with a cache file in `cache_dir` keyed by `fingerprint`:
    the same result and the same report (truncations counted, examples with no supervised token left raised as a
    DataError or, with on_bad_record="skip", recorded and given as None), read from the cache when it exists.
    num_proc: processes for the map (None: one). Raises DataError when no example is usable."""
    import datasets

    check_on_bad_record(on_bad_record)
    key = fingerprint(examples, tokenizer, max_seq_len)
    os.makedirs(cache_dir, exist_ok=True)
    hit = is_cached(cache_dir, key)
    index = datasets.Dataset.from_dict({"i": np.arange(len(examples), dtype=np.int64)})
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        table = index.map(_encode_batch, batched=True, batch_size=256, remove_columns=["i"], features=_features(),
                          fn_kwargs={"examples": examples, "tokenizer": tokenizer, "max_seq_len": max_seq_len},
                          cache_file_name=cache_path(cache_dir, key), new_fingerprint=key, load_from_cache_file=True,
                          num_proc=num_proc if num_proc and num_proc > 1 else None)
    finally:
        if was:
            datasets.enable_progress_bars()
    logger.info("tokenized %d examples: %s %s", len(examples), "cache hit" if hit else "written to",
                cache_path(cache_dir, key))
    out = EncodedTable(table)
    out.cache_hit = hit
    _report(out, examples, max_seq_len, on_bad_record, report)
    return out


def _report(table: EncodedTable, examples: list, max_seq_len: int, on_bad_record: str, report: SkipReport) -> None:
    """What `chat.encode_examples` reports, from the columns: truncations, and examples left without a supervised
    token (raised, or skipped and recorded)."""
    n_sup = table._n_supervised
    truncated = np.asarray(table.dataset["truncated"], dtype=bool) if len(table) else np.zeros(0, dtype=bool)
    empty = np.flatnonzero(n_sup == 0)
    for i in empty.tolist():
        handle(chat.no_answer_left(examples[i].source, max_seq_len), on_bad_record, report)
    n_truncated = int((truncated & (n_sup > 0)).sum())
    if n_truncated:
        report.note("truncated", n_truncated)
    chat.log_truncation(max_seq_len, n_truncated, len(examples), len(empty))
    if len(examples) and len(empty) == len(examples):
        raise DataError(examples[0].source.rsplit(":", 1)[0], None,
                        f"no example has a supervised token within max_seq_len={max_seq_len}",
                        "a longer --max-seq-len", kind="no_records", skippable=False)
