"""curvature_inv_sqrt under DeepSpeed ZeRO on 2 CPU ranks (gloo), against a plain torch AdamW run.

    python -m pytest tests/distributed/test_curvature.py -q

Each case trains a tiny model 3 steps through `deepspeed.initialize` (each rank its 2 of the 4 fixed
samples), reads the output layer's curvature on every rank, and compares it with a single-process
torch.optim.AdamW run on the same model and data (gradient = mean of the two ranks' losses, which is
what DeepSpeed's data-parallel averaging computes, clipped to norm 1 as DeepSpeed does by default).
It then scores each rank's samples with `output_layer_features` and the engine's curvature, and
compares with autograd per-sample gradients of the reference model. Stages 0-3 in fp32 (stage 3 also
with GPT-2's tied embeddings) must match to float rounding; ZeRO-3 in bf16 only closely. The first
DeepSpeed start on a machine compiles its shared-memory comm op (~90 s); later starts take seconds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, STEPS, LR, BETAS, EPS = 64, 3, 1e-3, (0.9, 0.95), 1e-8
CLIP = 1.0  # DeepSpeed's default gradient_clipping (1.0 in 0.19), stated so the reference can match it


def _model(tied: bool):
    import transformers

    torch.manual_seed(0)
    if tied:  # GPT-2 ties lm_head.weight to the input embedding
        config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _data():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 12), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[1, 8:] = -100  # a shorter answer
    labels[2, 5:7] = -100  # a second user turn
    return ids, labels


def _ds_config(stage: int, bf16: bool = False) -> dict:
    return {
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # torch_adam: torch.optim.AdamW, so no DeepSpeed Adam op is compiled on the CPU accelerator.
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0,
                                                  "torch_adam": True}},
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
    }


class _HeadInput:
    """The input of the output layer during a forward (forward pre-hook)."""

    def __init__(self, model):
        self.value = None
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0].detach()


def _train_and_read(rank: int, world_size: int, stage: int, tied: bool, bf16: bool) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state

    from optbatch_ds.scoring import curvature_inv_sqrt, output_layer_features

    deepspeed.init_distributed(dist_backend="gloo")
    model = _model(tied)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(stage, bf16))
    before = curvature_inv_sqrt(engine, EPS)
    ids, labels = _data()
    mine = slice(2 * rank, 2 * rank + 2)
    for _ in range(STEPS):
        loss = engine(input_ids=ids[mine], labels=labels[mine]).loss
        engine.backward(loss)
        engine.step()
    inv = curvature_inv_sqrt(engine, EPS)

    # The engine's own exp_avg_sq, fetched and bias-corrected here independently of curvature_inv_sqrt.
    weight = engine.module.get_output_embeddings().weight
    v = safe_get_full_optimizer_state(weight, "exp_avg_sq")  # collective: every rank calls it
    accessor = v is not None
    if v is None:  # no ZeRO: DeepSpeed's accessor has nothing to assemble
        v = engine.optimizer.state[weight]["exp_avg_sq"]
    own = (v.float() / (1 - BETAS[1] ** STEPS) + EPS).rsqrt()

    # Score this rank's samples as the trainer does: a no-grad forward, lm_head input from a hook.
    capture = _HeadInput(engine.module)
    with torch.no_grad():
        logits = engine(input_ids=ids[mine]).logits
    losses, feats = output_layer_features(capture.value, logits, labels[mine], inv_sqrt_v=inv, vocab_chunk=24)
    return dict(before=before, inv=inv, own=own.reshape(inv.shape), accessor=accessor,
                shape=tuple(getattr(weight, "ds_shape", weight.shape)),
                tied=weight is engine.module.get_input_embeddings().weight,
                global_steps=engine.global_steps, losses=losses, feats=feats)


def _reference(tied: bool) -> dict:
    """Single-process torch AdamW on the same model and data; autograd per-sample output-layer gradients."""
    model = _model(tied)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    ids, labels = _data()
    for _ in range(STEPS):
        opt.zero_grad()
        loss = (model(input_ids=ids[:2], labels=labels[:2]).loss + model(input_ids=ids[2:], labels=labels[2:]).loss) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # DeepSpeed clips before Adam sees the grads
        opt.step()
    weight = model.get_output_embeddings().weight
    state = opt.state[weight]
    assert int(state["step"]) == STEPS
    inv = (state["exp_avg_sq"] / (1 - BETAS[1] ** STEPS) + EPS).rsqrt()

    # G_i = d l_i / d W through the output-layer role only (a leaf copy, so tying does not leak in).
    capture = _HeadInput(model)
    with torch.no_grad():
        model(input_ids=ids)
    out_w = weight.detach().clone().requires_grad_()
    losses, feats = [], []
    for i in range(ids.shape[0]):
        mask = labels[i, 1:] != -100
        logits = F.linear(capture.value[i, :-1].double(), out_w.double())
        loss = F.cross_entropy(logits[mask], labels[i, 1:][mask])
        (grad,) = torch.autograd.grad(loss, out_w)
        losses.append(loss.detach())
        feats.append((grad * inv.double()).norm(dim=-1))
    return dict(inv=inv, losses=torch.stack(losses), feats=torch.stack(feats))


# bf16: the engine trains in bf16 (ZeRO keeps fp32 master weights and Adam state), the reference in
# fp32, so only closeness is checked there; fp32 runs must match torch AdamW to float rounding.
EXACT = dict(inv_max=1e-5, inv_median=1e-5, loss=1e-4, feats=1e-4)
BF16 = dict(inv_max=0.1, inv_median=0.01, loss=1e-2, feats=0.05)


@pytest.mark.parametrize("stage,tied,bf16", [(0, False, False), (1, False, False), (2, False, False),
                                             (3, False, False), (3, True, False), (3, False, True)])
def test_curvature_matches_plain_adamw(stage, tied, bf16):
    tol = BF16 if bf16 else EXACT
    ranks = run_distributed(_train_and_read, world_size=2, args=(stage, tied, bf16), timeout=180)
    ref = _reference(tied)
    for r in ranks:
        assert r["before"] is None  # no optimizer step yet: no curvature
        assert r["global_steps"] == STEPS and r["shape"] == (VOCAB, 16) and r["tied"] == tied
        assert r["accessor"] == (stage > 0)  # safe_get_full_optimizer_state covers ZeRO only
        assert r["inv"].dtype == torch.float32 and r["inv"].shape == (VOCAB, 16)
        assert torch.equal(r["inv"], ranks[0]["inv"])  # identical on every rank
        torch.testing.assert_close(r["inv"], r["own"], rtol=1e-7, atol=0)
        rel = (r["inv"].double() - ref["inv"].double()).abs() / ref["inv"].double()
        assert rel.max() < tol["inv_max"] and rel.median() < tol["inv_median"], \
            f"stage {stage}: relative difference to torch AdamW max {float(rel.max()):.2e}, " \
            f"median {float(rel.median()):.2e}"
    # Scored with the engine's curvature = the reference's autograd features for the same samples.
    losses = torch.cat([r["losses"] for r in ranks]).double()
    feats = torch.cat([r["feats"] for r in ranks]).double()
    torch.testing.assert_close(losses, ref["losses"], rtol=tol["loss"], atol=0)
    rel = ((feats - ref["feats"]).norm(dim=1) / ref["feats"].norm(dim=1)).max()
    assert rel < tol["feats"], f"features differ from the autograd reference by {float(rel):.2e}"
    inv_rel = ((ranks[0]["inv"].double() - ref["inv"].double()).abs() / ref["inv"].double()).max()
    print(f"stage {stage} tied {tied} bf16 {bf16}: inv_sqrt_v vs torch AdamW max rel {float(inv_rel):.1e}, "
          f"features vs autograd {float(rel):.1e}")
