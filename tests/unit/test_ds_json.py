"""The DeepSpeed JSON as users write it for Hugging Face: every "auto", missing sections, precision, leftovers.

    python -m pytest tests/unit/test_ds_json.py -q

Resolution is checked against the rules of transformers' HfTrainerDeepSpeedConfig with TrainingArguments'
defaults (max_grad_norm 1.0, adam betas (0.9, 0.999), eps 1e-8, weight decay 0, buckets from hidden_size).
"""
import json
import os

import pytest

from optbatch_ds.config import ConfigError, RunConfig, parse_args, resolve
from optbatch_ds.ds_json import AUTO_VALUES, auto_table

pytestmark = pytest.mark.unit

CASES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "cases")
HIDDEN = 128  # the built-in model's hidden size (modeling.DEFAULT_MODEL_CONFIG)


def _case(folder, name):
    return os.path.join(CASES, folder, name)


def _has_auto(value) -> bool:
    if isinstance(value, dict):
        return any(_has_auto(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_auto(v) for v in value)
    return isinstance(value, str) and value.lower() == "auto"


@pytest.mark.parametrize("name", ["hf_style_z3.json", "hf_style_z3_clip1.json"])
def test_hf_style_autos_resolve_as_hf_does(name):
    rs = resolve(RunConfig(deepspeed=_case("hf_style_auto", name)), world_size=2, num_train_samples=64)
    ds = rs.ds
    assert not _has_auto(ds)
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"] == {"lr": 1e-3, "weight_decay": 0.0}  # what the file does not say, DeepSpeed's
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == HIDDEN * HIDDEN
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
    assert zero["stage3_param_persistence_threshold"] == 10 * HIDDEN
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False  # "auto" on CPU
    assert (rs.micro_batch_size, rs.grad_accum, rs.train_batch_size) == (4, 1, 8)
    assert ds["scheduler"]["type"] == "WarmupDecayLR" and rs.sections_added == ("scheduler",)
    assert rs.to_json()["derived"]["sections_added"] == ["scheduler"]
    json.dumps(rs.to_json())  # what config.json records


def test_bucket_sizes_from_the_models_config(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    rs = resolve(RunConfig(deepspeed=_case("hf_style_auto", "hf_style_z3.json"), model=str(model)), 2)
    assert rs.ds["zero_optimization"]["reduce_bucket_size"] == 4096
    (model / "config.json").write_text(json.dumps({"model_type": "x", "text_config": {"hidden_sizes": [32, 96]}}))
    rs = resolve(RunConfig(deepspeed=_case("hf_style_auto", "hf_style_z3.json"), model=str(model)), 2)
    assert rs.ds["zero_optimization"]["stage3_param_persistence_threshold"] == 960
    (model / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.reduce_bucket_size is \"auto\".*hidden_size"):
        resolve(RunConfig(deepspeed=_case("hf_style_auto", "hf_style_z3.json"), model=str(model)), 2)


@pytest.mark.parametrize("name,added", [("no_optimizer.json", ("optimizer", "scheduler")),
                                        ("no_optimizer_z2.json", ("optimizer", "scheduler")),
                                        ("no_scheduler.json", ("scheduler",))])
def test_missing_sections_get_hf_defaults(name, added):
    rs = resolve(RunConfig(deepspeed=_case("no_optimizer", name)), world_size=2, num_train_samples=1000)
    assert rs.sections_added == added and not _has_auto(rs.ds)
    opt = rs.ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["lr"] == 1e-3
    if "optimizer" in added:
        assert opt["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    sched = rs.ds["scheduler"]["params"]
    steps = rs.to_json()["derived"]
    assert sched["total_num_steps"] > 1 and sched["warmup_max_lr"] == 1e-3 and "sections_added" in steps


def test_every_auto_of_the_table_resolves():
    """Each key of the README's table set to "auto" at once: nothing "auto" is left, nothing else fails."""
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 3}}
    for key, _ in AUTO_VALUES:
        node = ds
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {"type": "AdamW"} if part == "optimizer" else
                                   {"type": "WarmupDecayLR"} if part == "scheduler" else {})
        node[last] = "auto"
    rs = resolve(RunConfig(), 2, raw=ds, num_train_samples=500)
    assert not _has_auto(rs.ds) and rs.sections_added == ()
    assert rs.ds["optimizer"]["params"]["betas"] == [0.9, 0.999] and rs.ds["gradient_clipping"] == 1.0


def test_readme_auto_table_is_the_code():
    table = auto_table()
    assert table in open("README.md", encoding="utf-8").read()
    assert len(table.splitlines()) == len(AUTO_VALUES) + 2


@pytest.mark.parametrize("section,key", [({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}},
                                          "zero_optimization.sub_group_size"),
                                         ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "amsgrad": "auto"}}},
                                          "optimizer.params.amsgrad"),
                                         ({"activation_checkpointing": {"partition_activations": "auto"}},
                                          "activation_checkpointing.partition_activations")])
def test_an_auto_nothing_fills_is_named(section, key):
    base = json.load(open("ds_configs/zero3.json"))
    base.update(section)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ' (is "auto"|.*"auto")'):
        resolve(RunConfig(), 2, raw=base)


def test_fp16_on_cpu_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"fp16_true\.json: fp16\.enabled is true, but this machine trains on the "
                                          "CPU"):
        resolve(RunConfig(deepspeed=_case("fp16_on_cpu", "fp16_true.json")), 2, accelerator="cpu",
                bf16_supported=True, fp16_supported=True)
    with pytest.raises(ConfigError, match="fp16.enabled is true, but the cuda accelerator has no fp16"):
        resolve(RunConfig(deepspeed=_case("fp16_on_cpu", "fp16_true.json")), 2, accelerator="cuda",
                fp16_supported=False)
    rs = resolve(RunConfig(deepspeed=_case("fp16_on_cpu", "fp16_true.json")), 2, accelerator="cuda",
                 fp16_supported=True)
    assert rs.ds["fp16"]["enabled"] is True
    # bf16 where the accelerator has it (DeepSpeed's CPU accelerator does) trains; where it has not, refused.
    rs = resolve(RunConfig(deepspeed=_case("fp16_on_cpu", "bf16_true.json")), 2, accelerator="cpu",
                 bf16_supported=True)
    assert rs.ds["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="bf16.enabled is true, but the cuda accelerator has no bf16"):
        resolve(RunConfig(deepspeed=_case("fp16_on_cpu", "bf16_true.json")), 2, accelerator="cuda",
                bf16_supported=False)
    base = json.load(open("ds_configs/zero3.json"))
    base["bf16"], base["fp16"] = {"enabled": True}, {"enabled": True}
    with pytest.raises(ConfigError, match="both enabled"):
        resolve(RunConfig(), 2, raw=base, bf16_supported=True)
    base["bf16"], base["fp16"] = {"enabled": "yes"}, {"enabled": False}
    with pytest.raises(ConfigError, match="bf16.enabled is 'yes'"):
        resolve(RunConfig(), 2, raw=base)


def test_config_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + open("ds_configs/zero3.json", "rb").read())
    assert resolve(RunConfig(deepspeed=str(path)), 2).train_batch_size == 16


def test_chat_template_flag(tmp_path):
    assert parse_args(["--chat-template", "chatml"]).chat_template == "chatml"
    assert RunConfig().chat_template == "tokenizer"
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert parse_args(["--chat-template", str(path)]).chat_template == str(path)
    with pytest.raises(ConfigError, match="--chat-template chatmll: not one of .*did you mean 'chatml'"):
        parse_args(["--chat-template", "chatmll"])
    with pytest.raises(ConfigError, match="--chat-template missing.jinja: .*no such file"):
        parse_args(["--chat-template", "missing.jinja"])
