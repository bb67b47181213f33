"""Greedy farthest-point (max-min distance) filling of stratum quotas in sketch space, and the
mean nearest-neighbour distance used to report how diverse a chosen set is.

Cost: each stratum, on entry, gets its members' distance to everything already selected from one
chunked matrix product; after that each pick costs one matrix-vector product over the remaining
members of the current stratum only. Squared distances are kept throughout (same argmax).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Elements of the (members x selected) block a chunk of the entry product may hold (16 MiB fp32).
_CHUNK_ELEMS = 1 << 22


def prepare_sketches(sketches: torch.Tensor, distance: str) -> torch.Tensor:
    """Working copy of the sketches: float64 if given float64, else float32.

    euclidean: centred on their mean (distances are unchanged, and the ||a||^2 - 2ab + ||b||^2
    expansion loses less precision). cosine: rows normalised once, so the squared Euclidean
    distance is 2 (1 - cosine similarity), which ranks like the cosine distance. An all-zero
    sketch stays at the origin under cosine (distance 1 in squared units to every unit row).
    """
    dtype = torch.float64 if sketches.dtype == torch.float64 else torch.float32
    x = sketches.to(dtype=dtype, copy=True).contiguous()
    if distance == "cosine":
        x /= x.norm(dim=1, keepdim=True).clamp_(min=torch.finfo(dtype).tiny)
    else:
        x -= x.mean(dim=0, keepdim=True)
    return x


def _min_sqdist(xm: torch.Tensor, nm: torch.Tensor, xs: torch.Tensor, ns: torch.Tensor) -> torch.Tensor:
    """Squared distance of each row of xm to its nearest row of xs, in chunks of xs."""
    out = torch.full((xm.shape[0],), math.inf, dtype=xm.dtype)
    step = max(1, _CHUNK_ELEMS // max(1, xm.shape[0]))
    for a in range(0, xs.shape[0], step):
        # ns_j - 2 a.b_j per pair; ||a||^2 is constant along the row, added after the min.
        block = torch.addmm(ns[a:a + step].unsqueeze(0), xm, xs[a:a + step].T, beta=1, alpha=-2)
        torch.minimum(out, block.amin(dim=1), out=out)
    return out.add_(nm).clamp_(min=0)


def farthest_fill(x: torch.Tensor, groups: list[torch.Tensor], quotas: list[int]) -> torch.Tensor:
    """Fill each stratum's quota by greedy farthest-point selection, highest-loss stratum first.

    x: (n, k) prepared sketches; groups[s]: positions of stratum s in ascending order; quotas[s]:
    how many to take from it. The first pick is the member of the first stratum with a quota that
    is nearest to that stratum's centroid; every later pick is the remaining member of the current
    stratum whose distance to the nearest already-selected sample (any stratum) is largest.
    Ties go to the lowest position (up to floating-point rounding of the distances).
    Returns the picked positions in pick order (int64).
    """
    budget = int(sum(quotas))
    sqnorm = (x * x).sum(dim=1)
    sel_x = torch.empty((budget, x.shape[1]), dtype=x.dtype)
    sel_n = torch.empty(budget, dtype=x.dtype)
    picks = torch.empty(budget, dtype=torch.int64)
    done = 0
    for s in reversed(range(len(groups))):
        quota = int(quotas[s])
        if quota == 0:
            continue
        ids = groups[s]
        block, bnorm = x[ids], sqnorm[ids]  # copies; rows stay in ascending position order
        if done == 0:
            # ||a - m||^2 = ||a||^2 - 2 a.m + const: nearest member to the stratum's centroid.
            centroid = block.mean(dim=0)
            j = int(torch.argmin(torch.addmv(bnorm, block, centroid, beta=1, alpha=-2)))
            mind = torch.full((ids.numel(),), math.inf, dtype=x.dtype)
        else:
            mind = _min_sqdist(block, bnorm, sel_x[:done], sel_n[:done])
            j = int(torch.argmax(mind))
        dead = 0
        for t in range(quota):
            if t > 0:
                j = int(torch.argmax(mind))  # first maximum = lowest position among ties
            picks[done] = ids[j]
            sel_x[done] = block[j]
            sel_n[done] = bnorm[j]
            done += 1
            mind[j] = -math.inf
            dead += 1
            if t == quota - 1:
                break
            # Distance of every row of the block to the new pick; dead rows stay at -inf.
            dist = torch.addmv(bnorm, block, sel_x[done - 1], beta=1, alpha=-2)
            dist.add_(sel_n[done - 1]).clamp_(min=0)
            torch.minimum(mind, dist, out=mind)
            if dead * 4 > ids.numel():
                # Compact so the per-pick product runs over (mostly) live rows; amortised O(1) per pick.
                live = mind != -math.inf
                block, bnorm, ids, mind = block[live], bnorm[live], ids[live], mind[live]
                dead = 0
    return picks


def mean_nn_distance(sketches, idx) -> float:
    """Mean over the members of idx of the Euclidean distance to their nearest other member.

    sketches: (c, k) tensor or array; idx: positions into it. Returns nan for fewer than two
    members. The nearest neighbour is found with the fast expansion, then its distance is
    recomputed directly, so near-duplicates report ~0 rather than rounding noise.
    """
    x = sketches.detach().cpu() if isinstance(sketches, torch.Tensor) else torch.as_tensor(np.asarray(sketches))
    if x.dim() != 2:
        raise ValueError(f"sketches must have shape (c, k), got {tuple(x.shape)}")
    pos = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))
    if pos.numel() < 2:
        return float("nan")
    x = prepare_sketches(x[pos], "euclidean")
    m = x.shape[0]
    sqnorm = (x * x).sum(dim=1)
    nearest = torch.empty(m, dtype=torch.int64)
    step = max(1, _CHUNK_ELEMS // m)
    for a in range(0, m, step):
        rows = slice(a, min(m, a + step))
        block = torch.addmm(sqnorm.unsqueeze(0), x[rows], x.T, beta=1, alpha=-2)
        r = torch.arange(rows.start, rows.stop)
        block[r - a, r] = math.inf  # a member is not its own neighbour
        nearest[rows] = block.argmin(dim=1)
    d = (x - x[nearest]).to(torch.float64).norm(dim=1)
    return float(d.mean())
