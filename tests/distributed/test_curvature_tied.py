"""curvature_inv_sqrt with tied input/output embeddings and DeepSpeed's own AdamW, at every ZeRO stage (2 CPU ranks).

    python -m pytest tests/distributed/test_curvature_tied.py -q

The case of tests/fixtures/cases/tied_zero0: without ZeRO, DeepSpeed's FusedAdam counts a param group's steps on
the state of the last parameter it updated; with tied embeddings the output layer is the group's first parameter,
its own count stayed 0, and the curvature was silently never used (selection ran on raw gradients). The read must
give Adam's bias-corrected second moment of the output layer at stages 0-3, and say so when it cannot.
"""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.distributed

STEPS, BETA2, EPS = 2, 0.95, 1e-8


def _one_stage(rank: int, stage: int) -> dict:
    import deepspeed
    import torch
    import transformers
    from deepspeed.utils import safe_get_full_optimizer_state

    from optbatch_ds.scoring import curvature_inv_sqrt

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, BETA2], "eps": EPS,
                                                    "weight_decay": 0.0}},  # DeepSpeed's own AdamW, as users write it
          "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds, model_parameters=list(model.parameters()))
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 64, (2, 10), generator=gen)
    before = curvature_inv_sqrt(engine, EPS)  # no optimizer step yet: None, by design
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    inv = curvature_inv_sqrt(engine, EPS)
    weight = engine.module.get_output_embeddings().weight
    v = safe_get_full_optimizer_state(weight, "exp_avg_sq")  # collective under ZeRO; None without it
    if v is None:
        v = engine.optimizer.state[weight]["exp_avg_sq"]
    if inv is None:
        return {"before": before is None, "inv": None, "optimizer": type(engine.optimizer).__name__}
    expected = (v.detach().float().reshape(inv.shape) / (1 - BETA2 ** STEPS) + EPS).rsqrt()
    return {"before": before is None, "inv": float((inv - expected).abs().max() / expected.abs().max()),
            "optimizer": type(engine.optimizer).__name__}


def _body(rank: int, world_size: int, stages: tuple) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return {stage: _one_stage(rank, stage) for stage in stages}  # one process group: start-up paid once


def test_tied_embeddings_curvature_at_every_stage():
    results = run_distributed(_body, world_size=2, args=((0, 1, 2, 3),), timeout=900)
    for by_stage in results:
        for stage, r in by_stage.items():
            assert r["before"], (stage, r)
            assert r["inv"] is not None, f"stage {stage}: the curvature was not read ({r['optimizer']})"
            assert r["inv"] < 1e-5, (stage, r)
