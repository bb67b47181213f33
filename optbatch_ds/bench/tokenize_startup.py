"""Start-up cost of tokenization: Python lists on every start (before) against the Arrow cache (first start, then
every later start, rank and requeue). Run as:

    python launch/bench_tokenize.py --records 100000 --out /tmp/tok_bench        [--max-seq-len 256] [--json PATH]

Generates the demo set at that size (`data.make_demo_data`, DemoSpec(n_train=records)) and the built-in model's
tokenizer for it once, then measures, each in a fresh process (one rank):
  lists       `data.encode_examples` into Python lists, as every start did before (per rank: W ranks did it W times)
  arrow_miss  `data.cache.encode_cached` with an empty cache: tokenize through `datasets.map`, write the Arrow file
  arrow_hit   the same call again: fingerprint, find the file, memory-map it
For each: seconds for loading the records, for tokenization (wall and this process's CPU time, which a shared
machine does not inflate), the resident memory the encoded set added (RSS after
minus before, after a gc; Arrow pages are file-backed and shared by the ranks of a node) and its bytes per token.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

MODES = ("lists", "arrow_miss", "arrow_hit")


def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def _held_bytes(encoded) -> int:
    """Bytes the encoded set itself holds: for Python lists every list, Encoded object and distinct int object
    (sys.getsizeof, shared objects counted once); for the Arrow table its buffers (memory-mapped from the cache
    file: pages the OS shares between the ranks of a node and can drop)."""
    if hasattr(encoded, "dataset"):
        return int(encoded.dataset.data.nbytes)
    seen, total = set(), 0
    for enc in encoded:
        if enc is None:
            continue
        for obj in (enc, enc.__dict__, enc.input_ids, enc.labels, *enc.input_ids, *enc.labels):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += sys.getsizeof(obj)
    return total


def _measure(mode: str, data: str, model: str, cache: str, max_seq_len: int) -> dict:
    """One mode, in this process: timings (s), RSS added by the encoded set (bytes), tokens."""
    from optbatch_ds.data import SkipReport, encode_examples, load_examples
    from optbatch_ds.data.cache import encode_cached
    from optbatch_ds.modeling import load_tokenizer

    t0 = time.perf_counter()
    examples = load_examples(data)
    t_load = time.perf_counter() - t0
    tokenizer = load_tokenizer(model)
    encode_examples(examples[:50], tokenizer, max_seq_len, "skip", SkipReport())  # warm the template cache
    before = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "lists":
        encoded = encode_examples(examples, tokenizer, max_seq_len, "skip", SkipReport())
        pool = [i for i, e in enumerate(encoded) if e is not None and e.n_supervised > 0]
        tokens = sum(len(e.input_ids) for e in encoded if e is not None)
    else:
        encoded = encode_cached(examples, tokenizer, max_seq_len, "skip", SkipReport(), cache)
        pool = encoded.usable()
        assert encoded.cache_hit == (mode == "arrow_hit"), (mode, encoded.cache_hit)
        import pyarrow.compute as pc

        tokens = int(pc.sum(pc.list_value_length(encoded.dataset.data.column("input_ids"))).as_py())
    t_tok, c_tok = time.perf_counter() - t0, time.process_time() - c0
    added = _rss() - before
    held = _held_bytes(encoded)
    return {"mode": mode, "records": len(examples), "usable": len(pool), "tokens": tokens, "load_s": round(t_load, 2),
            "tokenize_s": round(t_tok, 2), "tokenize_cpu_s": round(c_tok, 2), "rss_added_mb": round(added / 2**20, 1),
            "rss_bytes_per_token": round(added / max(tokens, 1), 1), "held_mb": round(held / 2**20, 1),
            "held_bytes_per_token": round(held / max(tokens, 1), 1)}


def _prepare(args) -> tuple[str, str]:
    """The demo data at --records and the built-in model's directory for it (both cached under --out)."""
    from optbatch_ds.data import load_examples
    from optbatch_ds.data.demo import DemoSpec, make_demo_data
    from optbatch_ds.modeling import build_default_model

    data_dir = os.path.join(args.out, f"demo_{args.records}")
    if not os.path.exists(os.path.join(data_dir, "train.jsonl")):
        make_demo_data(data_dir, seed=0, spec=DemoSpec(n_train=args.records))
    data = os.path.join(data_dir, "train.jsonl")
    texts = [m["content"] for e in load_examples(data) for m in e.messages]
    return data, build_default_model(texts, os.path.join(args.out, "models"), seed=42)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/bench_tokenize.py", description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=100000)
    p.add_argument("--out", default="/tmp/optbatch_tokenize_bench")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)  # one measurement (internal)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cache = os.path.join(args.out, "tokenized")
    if args.mode:
        print(json.dumps(_measure(args.mode, args.data, args.model, cache, args.max_seq_len)))
        return 0
    data, model = _prepare(args)
    if os.path.isdir(cache):
        import shutil

        shutil.rmtree(cache)
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, "-m", "optbatch_ds.bench.tokenize_startup", "--mode", mode, "--data", data,
                              "--model", model, "--out", args.out, "--max-seq-len", str(args.max_seq_len)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| mode | records | tokens | load records s | tokenize s (wall) | tokenize s (CPU) | encoded set MB "
          "(bytes / token) | RSS added MB (bytes / token) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['records']} | {r['tokens']} | {r['load_s']} | {r['tokenize_s']} | "
              f"{r['tokenize_cpu_s']} | {r['held_mb']} ({r['held_bytes_per_token']}) | {r['rss_added_mb']} "
              f"({r['rss_bytes_per_token']}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
