"""Batches, rank shards and the training loss: the primitives every forward of the package shares.

    batch = collate(items, pad_id, device)              # items: objects with .input_ids and .labels
    per = per_sample_nll(model(**batch).logits, batch["labels"])
    mine = padded_shard(indices, rank, world)            # equal shards, for collective (ZeRO-3) forwards
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def collate(encoded: list, pad_id: int, device) -> dict:
    """Right-pad a list of `Encoded` (anything with input_ids and labels lists) to the longest.

    Returns input_ids (B, T) int64, attention_mask (B, T) int64 (1 on tokens) and labels (B, T) int64 with
    -100 on padding, on `device`."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL (nats) over each sample's supervised tokens: (B,) float32, differentiable.

    logits (B, T, V), labels (B, T) in the Hugging Face convention (position t predicts labels[t + 1],
    -100 = not supervised). NaN for a sample with no supervised token, so it cannot pass silently."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.clamp_min(0).reshape(-1),
                          reduction="none").view_as(shift_labels)
    n = mask.sum(1)
    return (tok * mask).sum(1) / n.clamp_min(1) + torch.where(n > 0, 0.0, float("nan"))


def padded_shard(items: list, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous shard of `items`, every shard ceil(n / world) long: the list is padded at its
    end by repeating items[0], so under ZeRO-3 (where every forward is collective) all ranks run the same
    number of forwards. Results of the padding are duplicates: drop them (gathered in rank order, the
    first n are the items themselves, in order)."""
    per = -(-len(items) // world)
    padded = list(items) + [items[0]] * (per * world - len(items)) if items else []
    return padded[rank * per:(rank + 1) * per]


def deal_by_length(lengths: list[int], world: int, accum: int) -> list[int]:
    """A reordering of one optimizer step's samples so every micro-batch holds samples of similar length.

    lengths: the token count of each of the step's b = world x accum x micro samples, in selection order.
    Returns positions into them: rank r trains positions[r * b / world:(r + 1) * b / world], its micro-batch a
    being the a-th micro-sized slice of that. Samples are sorted by length (longest first, ties in selection
    order) and cut into world x accum groups; group g goes to rank g % world at accumulation step g // world,
    so the ranks of one accumulation step get neighbouring groups (similar work, no rank waits long).
    The step trains the same samples with the same weights, and since every sample's loss counts
    1 / (world x accum x micro) wherever it sits, the same gradient up to summation order: only padding
    (and time) is saved.
    """
    b = len(lengths)
    groups = world * accum
    if b % groups:
        raise ValueError(f"{b} samples do not split into {world} ranks x {accum} micro-batches")
    micro = b // groups
    order = sorted(range(b), key=lambda i: (-lengths[i], i))
    out = [0] * b
    for g in range(groups):
        rank, step = g % world, g // world
        start = rank * accum * micro + step * micro
        out[start:start + micro] = order[g * micro:(g + 1) * micro]
    return out


def padded_positions(lengths: list[int], micro: int) -> int:
    """Token positions a list of samples occupies when cut into consecutive micro-batches of `micro`, each
    right-padded to its longest sample (the cost of collate's batches; tokens are sum(lengths))."""
    return sum(max(lengths[s:s + micro]) * len(lengths[s:s + micro]) for s in range(0, len(lengths), micro))
