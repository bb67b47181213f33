"""Loss-quantile strata and the per-stratum quotas of optbatch (exp(loss) draw) and ccs (even split)."""
from __future__ import annotations

import math

import torch


def loss_strata(losses: torch.Tensor, strata: int) -> list[torch.Tensor]:
    """Split candidates into `strata` contiguous loss-quantile groups.

    Candidates are sorted by (loss, position) ascending and cut like np.array_split, so sizes differ
    by at most one and the first groups get the extra member. Stratum K-1 holds the highest losses.
    Each returned tensor lists its members' positions in ascending position order (int64).
    """
    n = losses.numel()
    if strata > n:
        raise ValueError(f"strata={strata} is more than the {n} valid candidates; lower SelectionConfig.strata")
    order = torch.sort(losses, stable=True).indices
    base, extra = divmod(n, strata)
    groups, start = [], 0
    for s in range(strata):
        size = base + (1 if s < extra else 0)
        groups.append(torch.sort(order[start:start + size]).values)
        start += size
    return groups


def task_strata(groups: torch.Tensor | None, n: int) -> list[torch.Tensor]:
    """The positions 0..n-1 split by task group: one int64 tensor per distinct value of `groups` (n,), in
    ascending group order, each in ascending position order. groups None = one stratum of all n."""
    if groups is None:
        return [torch.arange(n, dtype=torch.int64)]
    return [torch.nonzero(groups == g).flatten() for g in torch.unique(groups).tolist()]


def proportional_quotas(sizes: list[int], budget: int) -> list[int]:
    """Quota of each stratum in proportion to its size: budget * size / total, rounded by largest remainder
    (Hamilton's method), so the quotas sum to `budget`, differ from the exact shares by less than one and
    never exceed a stratum's size. Remainder ties go to the lower index. Raises ValueError if budget > total."""
    total = sum(sizes)
    if not 0 <= budget <= total:
        raise ValueError(f"budget={budget} must be between 0 and the {total} candidates in the strata")
    quotas = [budget * size // total for size in sizes]  # integer arithmetic: exact shares round exactly
    order = sorted(range(len(sizes)), key=lambda s: (-(budget * sizes[s] % total), s))
    for s in order[:budget - sum(quotas)]:
        quotas[s] += 1
    return quotas


def gumbel_uniforms(n: int, generator: torch.Generator) -> torch.Tensor:
    """The n float64 uniforms the quota draw consumes from `generator` (first draw of optbatch)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    return u.clamp_(min=torch.finfo(torch.float64).tiny)


def gumbel_top_k(losses: torch.Tensor, budget: int, temperature: float, weighted: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """Positions of `budget` candidates drawn without replacement with P ~ exp(loss / temperature).

    Gumbel-top-k: keys = loss / tau + Gumbel noise, keep the `budget` largest keys. Works in log
    space, so large losses or small temperatures never overflow. weighted=False or tau=inf gives
    an unweighted draw (keys = noise only); a negative tau favours low losses. The generator is
    consumed identically either way.
    """
    gumbel = -torch.log(-torch.log(gumbel_uniforms(losses.numel(), generator)))
    keys = gumbel
    if weighted and math.isfinite(temperature):
        keys = losses.to(torch.float64) / temperature + gumbel
    return torch.sort(keys, descending=True, stable=True).indices[:budget]


def exp_loss_quotas(losses: torch.Tensor, groups: list[torch.Tensor], budget: int, temperature: float,
                    weighted: bool, generator: torch.Generator) -> list[int]:
    """Quota of each stratum = how many of a Gumbel-top-k draw of `budget` candidates fall in it."""
    stratum_of = torch.empty(losses.numel(), dtype=torch.int64)
    for s, members in enumerate(groups):
        stratum_of[members] = s
    drawn = gumbel_top_k(losses, budget, temperature, weighted, generator)
    return torch.bincount(stratum_of[drawn], minlength=len(groups)).tolist()


def even_quotas(sizes: list[int], budget: int) -> list[int]:
    """Spread `budget` evenly over strata (ccs), capped by each stratum's size.

    Water-filling: every round gives each stratum that still has room the same share of what is
    left (a stratum smaller than its share is filled and the excess goes round again); the final
    remainder, smaller than the number of open strata, goes one each to the highest-loss strata.
    """
    if budget > sum(sizes):
        raise ValueError(f"budget={budget} exceeds the {sum(sizes)} candidates in the strata")
    quotas = [0] * len(sizes)
    left = budget
    while left > 0:
        open_strata = [s for s in reversed(range(len(sizes))) if quotas[s] < sizes[s]]
        share, remainder = divmod(left, len(open_strata))
        if share == 0:
            for s in open_strata[:remainder]:
                quotas[s] += 1
            break
        for s in open_strata:
            add = min(share, sizes[s] - quotas[s])
            quotas[s] += add
            left -= add
    return quotas
