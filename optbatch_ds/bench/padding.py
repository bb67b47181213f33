"""How much of a step's compute goes to padding, with and without dealing by length (launch/bench_padding.py).

Run as:
    python launch/bench_padding.py                      # the demo set and a long-tailed mix, the shipped batch shapes

Simulates the trainer's steps without a model: the epoch sampler draws each pool, a random b of its c are
kept (the selection does not matter for padding), and the step's samples are cut into micro-batches as
launch/train.py cuts them, as selected or dealt by length (`batching.deal_by_length`, --group-by-length). A
micro-batch costs its size x its longest sample in token positions (`batching.padded_positions`); the
padded share is 1 - tokens / positions. Data: the demo training set tokenized by the built-in model's
tokenizer, and a long-tailed mix of lengths drawn from a lognormal distribution (median 400 tokens, sigma 0.8,
clipped to [16, 4096]).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from optbatch_ds.batching import deal_by_length, padded_positions
from optbatch_ds.config import num_candidates
from optbatch_ds.data import EpochSampler

SHAPES = ((2, 8, 1), (1, 16, 1), (2, 4, 2), (8, 4, 4))  # (ranks, micro batch, accumulation) per step


def padded_share(lengths: list[int], world: int, micro: int, accum: int, deal: bool, steps: int = 300,
                 prune_ratio: float = 0.3) -> float:
    """1 - tokens / padded positions over `steps` simulated steps of b = world x micro x accum samples."""
    b = world * micro * accum
    c = num_candidates(b, prune_ratio, world)
    sampler, rng = EpochSampler(len(lengths), seed=0), np.random.default_rng(0)
    tokens = positions = 0
    for _ in range(steps):
        kept = [lengths[i] for i in rng.permutation(sampler.draw(c))[:b]]
        if deal:
            kept = [kept[p] for p in deal_by_length(kept, world, accum)]
        tokens += sum(kept)
        positions += padded_positions(kept, micro)
    return 1.0 - tokens / positions


def _demo_lengths() -> list[int]:
    """Token counts of the demo training records under the built-in model's tokenizer (built or cached)."""
    import tempfile

    from optbatch_ds.data import SkipReport, encode_examples, load_examples, make_demo_data
    from optbatch_ds.modeling import build_default_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        examples = load_examples(make_demo_data(tmp, seed=0)["train"])
        model = build_default_model([m["content"] for e in examples for m in e.messages],
                                    os.path.join(os.path.expanduser("~"), ".cache", "optbatch_ds"), seed=42)
    encoded = encode_examples(examples, load_tokenizer(model), 256, "skip", SkipReport())
    return [len(e.input_ids) for e in encoded if e is not None]


def lognormal_lengths(n: int = 20000, median: float = 400.0, sigma: float = 0.8, seed: int = 0) -> list[int]:
    """A long-tailed mix of sequence lengths (tokens): lognormal around `median`, clipped to [16, 4096]."""
    x = np.random.default_rng(seed).lognormal(np.log(median), sigma, n)
    return [int(v) for v in np.clip(np.rint(x), 16, 4096)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/bench_padding.py", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="Simulated steps per shape.")
    p.add_argument("--json", default=None, help="Also write the numbers here.")
    args = p.parse_args(argv)
    rows = []
    for name, lengths in (("demo", _demo_lengths()), ("lognormal, median 400", lognormal_lengths())):
        for world, micro, accum in SHAPES:
            before = padded_share(lengths, world, micro, accum, False, args.steps)
            after = padded_share(lengths, world, micro, accum, True, args.steps)
            rows.append({"data": name, "ranks": world, "micro": micro, "accum": accum, "padded_as_selected": before,
                         "padded_dealt": after})
    print("| data | ranks x micro x accumulation | padded share, as selected | dealt by length |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['ranks']} x {r['micro']} x {r['accum']} | {100 * r['padded_as_selected']:.1f}% | "
              f"{100 * r['padded_dealt']:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
