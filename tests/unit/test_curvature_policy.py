"""The "curvature" key: the ema statistic against per-sample autograd gradients, the policy's resolution and state.

    python -m pytest tests/unit/test_curvature_policy.py -q
"""
from __future__ import annotations

import pytest
import torch

from optbatch_ds.config import OptBatchConfig
from optbatch_ds.errors import ConfigError
from optbatch_ds.scoring import (CurvaturePolicy, RowCurvature, SketchProjection, output_layer_features,
                                 resolve_curvature)
from tests.unit.test_scoring import _case

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_ema_statistic_equals_brute_force_autograd(seed, chunk):
    """sum_i ||G_i[u, :]||^2 / d over the samples with a supervised token, from the chunks the features form, is the
    same number as squaring each sample's autograd gradient of its loss w.r.t. lm_head.weight (float64, 1e-5)."""
    c = _case(seed, empty_rows=(2,))
    width = c["hidden"].shape[-1]
    rows = RowCurvature()
    output_layer_features(c["hidden"], c["logits"], c["labels"], vocab_chunk=chunk, row_curvature=rows)
    usable = torch.isfinite(c["loss"])
    reference = c["grad"][usable].square().sum(dim=(0, 2)) / width   # (V,): sum_i mean_j G_i[u, j]^2
    assert rows.count == int(usable.sum()) == 4
    torch.testing.assert_close(rows.sum_sq, reference, rtol=1e-5, atol=1e-12)
    # float32 inputs accumulate the same statistic (in float64) to float32 accuracy
    rows32 = RowCurvature()
    output_layer_features(c["hidden"].float(), c["logits"].float(), c["labels"], vocab_chunk=chunk,
                          row_curvature=rows32)
    torch.testing.assert_close(rows32.sum_sq, reference, rtol=1e-4, atol=1e-9)


def test_row_scale_divides_each_row_and_leaves_the_rest_untouched():
    """With a scale, f_i[u] = ||G_i[u, :]|| * scale[u]; without one the features are exactly the raw ones (the
    statistic is a by-product), and the per-element path is untouched by the option existing."""
    c = _case(4)
    h, z, y = c["hidden"], c["logits"], c["labels"]
    proj = SketchProjection(c["vocab"], sketch_dim=6, seed=1, block=5)
    raw_loss, raw = output_layer_features(h, z, y, projection=proj, vocab_chunk=5)
    loss, feats = output_layer_features(h, z, y, projection=proj, vocab_chunk=5, row_curvature=RowCurvature())
    assert torch.equal(loss, raw_loss) and torch.equal(feats, raw)
    scale = torch.rand(c["vocab"], dtype=torch.float64) + 0.5
    _, scaled = output_layer_features(h, z, y, vocab_chunk=5, row_curvature=RowCurvature(scale))
    reference = c["grad"].norm(dim=-1) * scale
    torch.testing.assert_close(scaled, reference, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="not both"):
        output_layer_features(h, z, y, inv_sqrt_v=c["inv_sqrt_v"], row_curvature=RowCurvature(scale))


class _Head(torch.nn.Module):
    def __init__(self, trains: bool):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight.requires_grad_(trains)

    def get_output_embeddings(self):
        return self.lm_head


@pytest.mark.parametrize("key,trains,expected", [("auto", True, "adam"), ("auto", False, "ema"), ("ema", True, "ema"),
                                                 ("none", False, "none"), ("adam", True, "adam")])
def test_auto_resolves_on_whether_lm_head_trains(key, trains, expected):
    assert resolve_curvature(key, _Head(trains)) == expected


def test_adam_with_a_frozen_head_is_an_error_never_a_fallback():
    with pytest.raises(ConfigError, match="frozen here.*ema"):
        CurvaturePolicy.build(OptBatchConfig(curvature="adam"), _Head(False), adam=lambda: None)
    with pytest.raises(ConfigError, match="curvature"):
        OptBatchConfig(curvature="fisher")
    with pytest.raises(ConfigError, match="curvature_beta"):
        OptBatchConfig(curvature_beta=1.0)


def test_ema_policy_folds_passes_in_like_adam_and_round_trips():
    """m <- beta m + (1 - beta) mean, bias-corrected: after one pass the scale is exactly 1/sqrt(mean + eps);
    identity (scale None) before any pass; the state survives a checkpoint."""
    policy = CurvaturePolicy("ema", beta=0.9, eps=1e-8)
    first = policy()
    assert isinstance(first, RowCurvature) and first.scale is None and not policy.ready
    first.sum_sq, first.count = torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64), 2   # mean [2, .5, 0]
    policy.after_scoring(first)
    second = policy()
    assert policy.ready
    torch.testing.assert_close(second.scale, (torch.tensor([2.0, 0.5, 0.0]) + 1e-8).rsqrt())
    second.sum_sq, second.count = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64), 1
    policy.after_scoring(second)
    m = 0.9 * 0.1 * torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64) + 0.1 * torch.tensor([0.0, 0.0, 3.0])
    torch.testing.assert_close(policy.moment, m)
    torch.testing.assert_close(policy.row_scale(), (m / (1 - 0.9 ** 2) + 1e-8).rsqrt().float())
    again = CurvaturePolicy("ema", beta=0.9, eps=1e-8)
    assert again.load_state_dict(policy.state_dict()) == []
    torch.testing.assert_close(again.row_scale(), policy.row_scale())
    assert CurvaturePolicy("adam", adam=lambda: None).load_state_dict(policy.state_dict())  # a warning, not reused


def test_adam_and_none_sources():
    v = torch.ones(10, 4)
    policy = CurvaturePolicy("adam", adam=lambda: v)
    assert policy() is v and policy.ready
    policy.after_scoring(v)  # a no-op for adam
    assert CurvaturePolicy("adam", adam=lambda: None)() is None
    assert CurvaturePolicy("none")() is None
