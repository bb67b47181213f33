"""Scoring under ZeRO-3 on 2 ranks equals a single-process computation; architectures users bring."""
import dataclasses
import json
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import REPO, read_jsonl, train_body

pytestmark = pytest.mark.distributed

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The demo data + default tokenizer (built once), and a tiny random model per architecture."""
    import transformers

    from optbatch_ds.modeling import build_default_model, cache_root
    from optbatch_ds.session import demo_data

    root = tmp_path_factory.mktemp("archs")
    demo = demo_data(str(root / "x"))
    texts = [m["content"] for l in read_jsonl(demo["train"]) for m in l["messages"]]
    default = build_default_model(texts, cache_root(str(root / "x")), seed=0)
    tok = transformers.AutoTokenizer.from_pretrained(default)
    dirs = {}
    for name, (cfg_cls, model_cls, kw) in ARCHS.items():
        cfg = getattr(transformers, cfg_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(cfg)
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[name] = str(d)
    return {"root": root, "demo": demo, "dirs": dirs}


class _Plain:
    """Just enough of an engine for score_candidates: a plain, unpartitioned model."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, **kw):
        return self.module(**kw)


def _gathered_vs_single_body(rank, world, model_dir, demo_train):
    os.chdir(REPO)
    import deepspeed
    from transformers import AutoModelForCausalLM

    from optbatch_ds import comm
    from optbatch_ds.config import OptBatchConfig
    from optbatch_ds.data import encode_examples, load_examples
    from optbatch_ds.modeling import load_model, load_tokenizer
    from optbatch_ds.batching import collate, per_sample_nll
    from optbatch_ds.scoring import Scorer, SketchProjection, curvature_inv_sqrt

    comm.init_distributed(120)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    tok = load_tokenizer(model_dir)
    enc = encode_examples(load_examples(demo_train)[:24], tok, 128)
    model, _keep = load_model(model_dir, ds)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    for s in range(2):  # real Adam state for the curvature term
        batch = collate(enc[8 * s + 4 * rank: 8 * s + 4 * rank + 4], tok.pad_token_id, engine.device)
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        engine.backward(per_sample_nll(out.logits, batch["labels"]).mean())
        engine.step()
    inv = curvature_inv_sqrt(engine, 1e-8)
    ob = OptBatchConfig(sketch_dim=64)
    vocab = engine.module.config.vocab_size
    proj = SketchProjection(vocab, 64, seed=0)
    timers = dict.fromkeys(("score_forward", "features"), 0.0)
    fixed = enc[:12]  # the same 12 samples: 6 per rank under ZeRO-3, all 12 in one process
    scorer = Scorer(ob.feature, ob.vocab_chunk, with_features=True, projection=proj, batch_size=4, pad_id=tok.pad_token_id)
    l, f, _ = scorer.score(engine, fixed[6 * rank: 6 * rank + 6], inv, timers)
    all_l, all_f = comm.gather_to_rank0(l), comm.gather_to_rank0(f)
    state = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if rank == 0:
                state[name] = p.detach().clone()
    del _keep  # transformers would otherwise build the reference model partitioned (zero.Init) too
    comm.barrier()
    if rank != 0:
        return None
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected
    single = dataclasses.replace(scorer, batch_size=5)  # other batch boundaries than the ranks'
    sl, sf, _ = single.score(_Plain(plain), fixed, inv, dict(timers))
    return {"l": all_l, "f": all_f, "sl": sl, "sf": sf, "inv_is_none": inv is None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero3_gathered_scores_equal_single_process(workdir, arch):
    res = run_distributed(_gathered_vs_single_body, 2, args=(workdir["dirs"][arch], workdir["demo"]["train"]),
                          timeout=600)[0]
    assert not res["inv_is_none"]
    torch.testing.assert_close(res["l"], res["sl"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res["f"], res["sf"], rtol=1e-4, atol=1e-4 * float(res["sf"].abs().max()))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_optbatch_loop_on_architecture(workdir, arch):
    """The loop with curvature-normalised features on each architecture's own output layer: these models are
    freshly initialised, so the from-scratch preset (a --model otherwise gets "finetune", which needs neither)."""
    out = workdir["root"] / f"run_{arch}"
    cfg = json.load(open("ds_configs/zero3.json"))
    cfg["optbatch"]["preset"] = "default"
    config = workdir["root"] / "zero3_default_preset.json"
    config.write_text(json.dumps(cfg))
    argv = ["--deepspeed", str(config), "--model", workdir["dirs"][arch], "--data", workdir["demo"]["train"],
            "--eval-data", workdir["demo"]["eval"], "--output-dir", str(out), "--max-steps", "3",
            "--eval-samples-per-task", "1", "--eval-max-new-tokens", "4", "--log-every", "0", "--learning-rate", "1e-3"]
    res = run_distributed(train_body, 2, args=(argv,), timeout=600)
    assert res[0]["history"] == res[1]["history"] and len(res[0]["history"]) == 3
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(sum(m["quotas"]) == 16 for m in metrics)
    assert metrics[-1]["time"]["curvature"] > 0 and all(m["excluded_nonfinite"] == 0 for m in metrics)
    assert (out / "final" / "model.safetensors").exists()
