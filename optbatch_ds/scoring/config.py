"""The scoring keys of the "optbatch" section: which per-sample feature step 2 computes, and how."""
from __future__ import annotations

from dataclasses import dataclass

from optbatch_ds.options import as_float, as_int, bad, check_choices, option

FEATURES = ("grad_curvature", "grad_raw", "hidden")
SCORINGS = ("fresh", "stale")
PRIORS = ("fresh", "mean", "train")
CURVATURES = ("auto", "adam", "ema", "none")


@dataclass(frozen=True)
class ScoringConfig:
    """How step 2 (DESIGN §2) scores a candidate: its loss, and the feature the farthest-point step compares."""

    feature: str = option("grad_curvature", "Per-sample feature: grad_curvature (output-layer gradient / "
                          "sqrt(Adam v)), grad_raw (no curvature normalisation, ablation) or hidden (mean lm_head "
                          "input, ablation).", choices=FEATURES)
    sketch_dim: int = option(512, "k, the random-projection dimension of the features (0 = no projection); 512 "
                             "keeps pairwise distances within ~12% (tests/unit/test_scoring.py JL test).")
    curvature: str = option("auto", "v of grad_curvature: adam (lm_head's Adam second moment; needs a trained "
                            "lm_head), ema (a running mean of each vocab row's squared per-sample output-layer "
                            "gradient, from the forwards that compute features anyway: works with a frozen lm_head and sends a V-vector "
                            "instead of V x d), none (v = 1), auto (adam when lm_head trains, else ema: LoRA).",
                            choices=CURVATURES)
    curvature_beta: float = option(0.95, "Decay of the ema curvature per pass folded in (a scoring pass; with "
                                   "scoring stale also each step's training forwards); bias-corrected like Adam's "
                                   "beta2; 0.95 averages about the last 20 passes.")
    eps: float = option(1e-8, "eps in 1/sqrt(v + eps), the curvature normaliser.")
    vocab_chunk: int = option(4096, "Vocabulary rows per chunk in the feature computation (bounds memory).")
    score_batch_size: int = option(0, "Samples per scoring forward; 0 = 2 x train_micro_batch_size_per_gpu (no "
                                   "activations are kept for backward, so twice the micro batch fits).")
    scoring: str = option("stale", "fresh: a scoring forward over every candidate each step (the paper's); stale: the "
                          "loss and sketch recorded when a sample was last trained (computed inside the training "
                          "forward, no second forward) or last scored; a sample never measured is scored fresh.",
                          choices=SCORINGS)
    refresh: float = option(0.0, "With scoring stale: this fraction of each step's budget is drawn uniformly from the "
                            "candidates the selector did not keep, so pruned samples get re-measured.")
    prior: str = option("fresh", "With scoring stale, what a candidate never measured gets: fresh (a scoring forward) "
                        "or mean (no forward: the mean loss measured so far among its task's records, and no sketch; "
                        "before anything is measured, the task's mean reference loss among the pool's candidates, "
                        "or 0 without reference losses; so signal reducible ranks such candidates of a task by their "
                        "reference loss, and the others treat them alike) or train (as mean, and such candidates "
                        "rank above every measured one: a pool keeps its never-measured candidates first, so every "
                        "record is trained, and measured, soon after it is first drawn).",
                        choices=PRIORS)

    def __post_init__(self):
        check_choices(self, ScoringConfig)
        sketch_dim, chunk, score_bs = (as_int(getattr(self, k), k) for k in ("sketch_dim", "vocab_chunk",
                                                                              "score_batch_size"))
        eps = as_float(self.eps, "eps", allow_inf=False)
        refresh = as_float(self.refresh, "refresh", allow_inf=False)
        if not 0.0 <= refresh < 1.0:
            raise bad("refresh", f"{self.refresh} must be in [0, 1) (a fraction of each step's budget)")
        if refresh > 0 and self.scoring != "stale":
            raise bad("refresh", "only applies to scoring 'stale' (fresh scoring re-measures every candidate)")
        if self.prior != "fresh" and self.scoring != "stale":
            raise bad("prior", "only applies to scoring 'stale' (fresh scoring measures every candidate)")
        beta = as_float(self.curvature_beta, "curvature_beta", allow_inf=False)
        if not 0.0 <= beta < 1.0:
            raise bad("curvature_beta", f"{self.curvature_beta} must be in [0, 1)")
        if sketch_dim < 0:
            raise bad("sketch_dim", f"{self.sketch_dim} must be >= 0 (0 = use the features unprojected)")
        if not eps > 0:
            raise bad("eps", f"{self.eps} must be > 0")
        if chunk < 1:
            raise bad("vocab_chunk", f"{self.vocab_chunk} must be >= 1")
        if score_bs < 0:
            raise bad("score_batch_size", f"{self.score_batch_size} must be >= 0 (0 = 2 x the micro batch)")
        for key, value in (("sketch_dim", sketch_dim), ("vocab_chunk", chunk), ("score_batch_size", score_bs),
                           ("eps", eps), ("refresh", refresh), ("curvature_beta", beta)):
            object.__setattr__(self, key, value)
