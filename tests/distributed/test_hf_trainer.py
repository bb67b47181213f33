"""OptBatchTrainer (transformers.Trainer + OptBatch) on 2 CPU ranks: DeepSpeed ZeRO-2/3 and plain DDP.

Every rank must train on exactly its share of what the selector chose, the choice must be the one
`selection.select` makes from the gathered losses and sketches, both ranks must agree, and training
must move the parameters.
"""
import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.distributed

N_ROWS, VOCAB, MICRO, STEPS = 64, 64, 2, 3
# signal "loss", so the test can recompute each choice from the gathered losses and sketches alone; the zero3 case
# scores stale (values recorded in the training forward), the others fresh
OPTBATCH = dict(preset="paper", method="optbatch", prune_ratio=0.3, strata=3, sketch_dim=16, seed=3)


def _rows():
    """Token 0 of row i is i, so a trained sequence names its row; a 2-4 token prompt is masked."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(N_ROWS):
        n = int(torch.randint(6, 13, (1,), generator=g))
        ids = [i] + torch.randint(0, VOCAB, (n - 1,), generator=g).tolist()
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _body(rank, world, mode, accum, method, out):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from optbatch_ds.config import OptBatchConfig
    from optbatch_ds.hf_trainer import OptBatchTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    section = dict(OPTBATCH, method=method, scoring="stale" if mode == "zero3" else "fresh")
    optbatch = OptBatchConfig.from_dict(section)
    ds = None
    if mode != "ddp":
        ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 10**9,
              "zero_optimization": {"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0}}
        if mode == "zero3":  # the "optbatch" section rides in the DeepSpeed JSON, as in ds_configs/
            ds["optbatch"], optbatch = section, None
    args = TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=accum, learning_rate=1e-2, use_cpu=True, report_to=[],
                             deepspeed=ds, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)

    class Recording(OptBatchTrainer):
        trained = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
                self.trained.append((ids[0], ids[:sum(mask)]))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Recording(model=model, args=args, train_dataset=_rows(), optbatch=optbatch, record_history=True)
    trainer.train()
    assert trainer.is_deepspeed_enabled == (mode != "ddp")
    curvature_check = None
    if mode == "ddp":  # without DeepSpeed the curvature is read from the torch optimizer's own state
        w = model.get_output_embeddings().weight
        state, group = trainer.optimizer.state[w], trainer.optimizer.param_groups[0]
        v = state["exp_avg_sq"] / (1 - group["betas"][1] ** int(state["step"]))
        curvature_check = bool(torch.allclose(trainer._curvature(), (v + optbatch.eps).rsqrt(), rtol=1e-6))
    params = list(trainer.model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # a no-op unless ZeRO-3
        changed = {k: not torch.equal(before[k], p.detach()) for k, p in trainer.model.named_parameters()}
    logged = [h for h in trainer.state.log_history if "optbatch/mean_loss_selected" in h]
    sizes = trainer._ob.rt.sizes  # the shared step's runtime, built with the train dataloader
    return {"rank": rank, "history": trainer.optbatch_history, "trained": trainer.trained, "changed": changed,
            "b": sizes.train_batch_size, "c": sizes.candidates, "logged": logged, "curvature_check": curvature_check,
            "config": trainer.optbatch}


CASES = [("zero3", 1, "optbatch"), ("zero2", 2, "optbatch"), ("ddp", 2, "optbatch"), ("ddp", 1, "infobatch")]


@pytest.mark.parametrize("mode,accum,method", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_ranks_train_on_what_the_selector_chose(tmp_path, mode, accum, method):
    from optbatch_ds.data import EpochSampler
    from optbatch_ds.selection import Candidates, select, step_generator

    res = run_distributed(_body, 2, args=(mode, accum, method, str(tmp_path / "out")), timeout=600)
    rows = _rows()
    b, c = res[0]["b"], res[0]["c"]
    assert (b, c) == (MICRO * accum * 2, {4: 6, 8: 12}[MICRO * accum * 2])  # c = ceil(b / 0.7), even
    h0, h1 = res[0]["history"], res[1]["history"]
    assert [h["step"] for h in h0] == [1, 2, 3]
    assert [(h["candidates"], h["selected"], h["weights"]) for h in h0] == \
           [(h["candidates"], h["selected"], h["weights"]) for h in h1]  # both ranks saw the same selection
    sampler = EpochSampler(N_ROWS, seed=0)
    config = res[0]["config"].selection_config()
    assert config.method == method
    for h in h0:
        assert h["candidates"] == sampler.draw(c)  # the seeded epoch order
        # rank 0's choice is the pure selector's, recomputed from the gathered losses and sketches
        again = select(Candidates(h["losses"], h["sketches"]), b, config, step_generator(config.seed, h["step"]))
        assert [h["candidates"][p] for p in again.indices.tolist()] == h["selected"]
        assert again.weights.tolist() == h["weights"]
        assert h["losses"].shape == (c,) and (h["sketches"] is None) == (method != "optbatch")
    if method == "optbatch":  # no Adam state before the first optimizer step, curvature after it
        assert [h["curvature"] for h in h0] == [False, True, True]
        assert all(h["sketches"].shape == (c, 16) for h in h0)
    else:
        assert any(w != 1.0 for h in h0 for w in h["weights"])  # infobatch reweights its kept low-loss samples
    for r in (0, 1):  # every rank trained on exactly its share of the selection, in order
        trained = res[r]["trained"]
        assert [i for i, _ in trained] == [i for h in h0 for i in h["selected"][r * b // 2:(r + 1) * b // 2]]
        assert all(seq == rows[i]["input_ids"] for i, seq in trained)
        assert not [k for k, moved in res[r]["changed"].items() if not moved], "parameters not trained"
        logged = res[r]["logged"]  # the selection info rides on the Trainer's own log lines
        assert [l["step"] for l in logged] == [1, 2, 3]
        if method == "optbatch":
            assert all(sum(l[f"optbatch/quota_{s}"] for s in range(3)) == b for l in logged)
    if mode == "ddp":
        assert res[0]["curvature_check"] and res[1]["curvature_check"]
    lines = (tmp_path / "out" / "selection.jsonl").read_text().splitlines()
    assert [__import__("json").loads(l)["selected"] for l in lines] == [h["selected"] for h in h0]
