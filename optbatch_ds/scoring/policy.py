"""Where the curvature of the grad_curvature feature comes from: the "optbatch" key `curvature`, resolved once.

    policy = CurvaturePolicy.build(optbatch, module, adam=lambda: curvature_inv_sqrt(engine, eps))
    policy.source                  # "adam", "ema" or "none" (auto resolved: adam when lm_head trains, else ema)
    normaliser = policy()          # collective: (V, d) tensor (adam), RowCurvature (ema) or None; what the scorer uses
    policy.after_scoring(normaliser)   # collective: ema folds the pass's row statistics in (all ranks sum them)

adam   1 / sqrt(v_hat + eps) of lm_head.weight's Adam state, read through DeepSpeed (scoring.curvature): needs a
       trained lm_head; asking for it with a frozen one is a ConfigError, never a silent fallback.
ema    m_u <- beta m_u + (1 - beta) mean_i ||G_i[u, :]||^2 / d over each pass folded in (all ranks: a scoring
       pass, and with scoring "stale" each step's training forwards of the kept samples, step.fold_curvature),
       bias-corrected like Adam's v; the normaliser divides row u by sqrt(m_u + eps). Needs no optimizer state,
       so it works with a frozen lm_head (LoRA), and under ZeRO-3 the per-step traffic is one V-vector all-reduce instead of
       gathering a V x d state. Its statistic is the per-sample second moment (Adam's v is the minibatch
       gradient's), averaged over the d columns of a row.
none   v = 1: the raw output-layer gradient (the grad_raw ablation, by another name).
Before any statistic exists (adam before the first optimizer step, ema before the first pool) the identity is
used, as DESIGN §2 says; `ready` says whether the last normaliser was a real one.
"""
from __future__ import annotations

import torch

from optbatch_ds import comm
from optbatch_ds.errors import ConfigError

from .features import RowCurvature


def output_layer_trains(module) -> bool:
    """Whether the output layer's weight is trained (full fine-tuning, or LoRA with lm_head in modules_to_save:
    PEFT's wrapper then answers `.weight` with the trainable copy)."""
    return bool(module.get_output_embeddings().weight.requires_grad)


def resolve_curvature(curvature: str, module) -> str:
    """auto -> adam when the output layer trains, else ema; adam with a frozen output layer is a ConfigError."""
    trains = output_layer_trains(module)
    if curvature == "auto":
        return "adam" if trains else "ema"
    if curvature == "adam" and not trains:
        raise ConfigError('"optbatch".curvature: adam reads the Adam state of lm_head, which is frozen here (LoRA); '
                          'use "ema" (or "auto"), or train lm_head with --lora-modules-to-save lm_head')
    return curvature


class CurvaturePolicy:
    """The run's curvature source and (for ema) its running statistic. Callable: every rank calls it at the same
    points (it is collective for adam)."""

    def __init__(self, source: str, adam=None, beta: float = 0.95, eps: float = 1e-8):
        self.source, self.beta, self.eps = source, float(beta), float(eps)
        self._adam = adam
        self.moment: torch.Tensor | None = None  # ema: m (V,), float64, not bias-corrected
        self.updates = 0                          # ema: pools folded in
        self.ready = False                        # whether the last normaliser was a real one

    @classmethod
    def build(cls, optbatch, module, adam) -> "CurvaturePolicy":
        """From the "optbatch" section (curvature, curvature_beta, eps) and the model being trained; `adam` is the
        collective callable reading 1 / sqrt(Adam v + eps) (None before Adam has state). Raises ConfigError."""
        source = resolve_curvature(optbatch.curvature, module)
        return cls(source, adam=adam, beta=optbatch.curvature_beta, eps=optbatch.eps)

    def __call__(self):
        """The normaliser for the next scoring pass: (V, d) tensor (adam), a RowCurvature (ema; its scale is None
        until a pool has been folded in), or None (none, or adam without state)."""
        if self.source == "adam":
            v = self._adam()
            self.ready = v is not None
            return v
        if self.source == "ema":
            self.ready = self.updates > 0
            return self.rows()
        self.ready = False
        return None

    def rows(self) -> RowCurvature:
        """ema: a fresh RowCurvature for one more pass, with the statistic as it stands now (every earlier pass
        folded in). Leaves `ready` as the step's first read set it. Local (no collective)."""
        return RowCurvature(self.row_scale() if self.updates > 0 else None)

    def row_scale(self) -> torch.Tensor:
        """1 / sqrt(m_hat + eps), (V,) float32, m_hat = m / (1 - beta ** updates)."""
        m_hat = self.moment / (1.0 - self.beta ** self.updates)
        return (m_hat + self.eps).rsqrt().to(torch.float32)

    def after_scoring(self, normaliser) -> None:
        """Fold a pass's row statistics into the EMA (ema only; a no-op otherwise). Collective: the sums and counts
        of every rank are added (one all-reduce of V + 1 float64), so every rank holds the same m."""
        if not isinstance(normaliser, RowCurvature) or normaliser.sum_sq is None:
            if self.source == "ema":
                raise RuntimeError("the ema curvature needs the scoring pass's row statistics; was the pass run "
                                   "with the RowCurvature this policy returned?")
            return
        local = torch.cat([normaliser.sum_sq.detach().to("cpu", torch.float64),
                           torch.tensor([float(normaliser.count)], dtype=torch.float64)])
        total = comm.sum_over_ranks(local)
        if total[-1] <= 0:
            return  # nothing finite was scored anywhere: keep the statistic as it is
        mean = total[:-1] / total[-1]
        self.moment = mean.mul(1.0 - self.beta) if self.moment is None else \
            self.moment.mul(self.beta).add_(mean, alpha=1.0 - self.beta)
        self.updates += 1

    def state_dict(self) -> dict:
        """What a checkpoint keeps (ema's running statistic; nothing else is state)."""
        return {"source": self.source, "updates": self.updates, "moment": self.moment}

    def load_state_dict(self, state: dict | None) -> list[str]:
        """Restore `state_dict()`; returns warnings (a checkpoint written with another curvature source)."""
        if not state:
            return []
        if state.get("source") != self.source:
            return [f"the checkpoint's curvature was {state.get('source')!r}, this run uses {self.source!r}: its "
                    "statistic is not reused"]
        self.updates = int(state.get("updates", 0))
        moment = state.get("moment")
        self.moment = moment.to(torch.float64) if moment is not None else None
        return []
