import json

import math

import pytest

from optbatch_ds.config import ConfigError, OptBatchConfig, RunConfig, num_candidates, parse_args, planned_steps, resolve
from optbatch_ds.config import _optbatch_section

pytestmark = pytest.mark.unit


def _ds(**over):
    base = json.load(open("ds_configs/zero3.json"))
    base.update(over)
    return base


def test_shipped_configs_resolve():
    for name in ("zero2", "zero3", "zero3_offload"):
        rs = resolve(RunConfig(deepspeed=f"ds_configs/{name}.json"), world_size=2, num_train_samples=1000)
        assert rs.train_batch_size == rs.micro_batch_size * rs.grad_accum * 2
        assert "optbatch" not in rs.ds and "_comment" not in rs.ds
        assert rs.ds["optimizer"]["params"]["lr"] == 1e-3  # "auto" on the built-in model
        assert rs.ds["bf16"]["enabled"] is False  # "auto" on CPU
        assert all(v != "auto" for v in rs.ds["scheduler"]["params"].values())


def test_auto_batch_sizes_and_arithmetic_message():
    rs = resolve(RunConfig(), 4, raw=_ds(train_batch_size=64, train_micro_batch_size_per_gpu="auto",
                                         gradient_accumulation_steps=2))
    assert (rs.micro_batch_size, rs.grad_accum) == (8, 2)
    with pytest.raises(ConfigError, match=r"train_batch_size 30 != .* 8 x gradient_accumulation_steps 1 x world size 2"):
        resolve(RunConfig(), 2, raw=_ds(train_batch_size=30))
    with pytest.raises(ConfigError, match="not divisible"):
        resolve(RunConfig(), 2, raw=_ds(train_batch_size=30, train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps=4))


@pytest.mark.parametrize("alpha,b,w,expected", [(0.3, 16, 2, 24), (0.5, 16, 2, 32), (0.0, 16, 2, 16), (0.7, 8, 4, 28)])
def test_candidates(alpha, b, w, expected):
    c = num_candidates(b, alpha, w)
    assert c == expected and c % w == 0 and c >= b / (1 - alpha) - 1e-9


def test_unknown_optbatch_key_names_nearest():
    with pytest.raises(ConfigError, match="did you mean 'prune_ratio'"):
        OptBatchConfig.from_dict({"prune_ration": 0.3})
    with pytest.raises(ConfigError, match="did you mean 'strata'"):  # a key with a suffix: its stem, not strata_by
        OptBatchConfig.from_dict({"strata_count": 3})


def test_shipped_configs_use_the_package_defaults_and_comments_are_ignored():
    import glob
    import json
    for path in glob.glob("ds_configs/*.json"):
        section = json.load(open(path, encoding="utf-8"))["optbatch"]
        cfg = OptBatchConfig.from_dict(section)
        assert cfg == OptBatchConfig.from_dict({"prune_ratio": 0.3}), path
    assert OptBatchConfig.from_dict({"preset": "paper"}).within == "farthest"
    with_refs = OptBatchConfig.from_dict({"reference_losses": "refs"})
    assert (with_refs.signal, with_refs.preset) == ("reducible", "reference")  # config.json names the preset used
    assert (with_refs.strata, with_refs.within, with_refs.scoring, with_refs.prior) == (1, "top", "stale", "train")


def test_the_preset_follows_what_is_trained():
    """No "preset" key: a pretrained model (--model, the Trainer) gets "finetune", the built-in model trained
    from scratch "default", reference losses "reference"; a named preset and keys beside it win."""
    ft = OptBatchConfig.from_dict({}, pretrained=True)
    assert (ft.preset, ft.signal, ft.strata, ft.within, ft.scoring, ft.prior) == (
        "finetune", "truncation", 1, "top", "stale", "mean")
    assert OptBatchConfig.from_dict({}).preset == "default" and OptBatchConfig.from_dict({}).signal == "neighbours"
    assert OptBatchConfig.from_dict({"reference_losses": "r"}, pretrained=True).preset == "reference"
    # the reference preset at a deep cut measures never-measured candidates once (prior fresh), unless told not to
    for ratio, written, prior in ((0.3, {}, "train"), (0.49, {}, "train"), (0.5, {}, "fresh"), (0.7, {}, "fresh"),
                                  (0.5, {"prior": "mean"}, "mean"), (0.3, {"prior": "fresh"}, "fresh")):
        for section in ({"reference_losses": "r"}, {"preset": "reference", "reference_losses": "r"}):
            cfg = OptBatchConfig.from_dict({**section, **written, "prune_ratio": ratio})
            assert (cfg.preset, cfg.prior) == ("reference", prior), (section, ratio, written)
    assert OptBatchConfig.from_dict({"prune_ratio": 0.5}, pretrained=True).prior == "mean"  # finetune: unmeasured
    with pytest.raises(ConfigError, match="prune_ratio"):
        OptBatchConfig.from_dict({"reference_losses": "r", "prune_ratio": "half"})
    assert OptBatchConfig.from_dict({"preset": "default"}, pretrained=True).signal == "neighbours"
    assert OptBatchConfig.from_dict({"prior": "fresh"}, pretrained=True).prior == "fresh"
    run = parse_args(["--deepspeed", "ds_configs/zero3.json", "--model", "some/dir"])
    assert _optbatch_section(run, {}).preset == "finetune"
    assert _optbatch_section(parse_args(["--deepspeed", "ds_configs/zero3.json"]), {}).preset == "default"
    from optbatch_ds.hf_trainer import optbatch_config_from
    assert optbatch_config_from({"prune_ratio": 0.5}, None).preset == "finetune"
    # asking for fresh scoring drops the preset's prior (it only means something for stale scoring)
    fresh = OptBatchConfig.from_dict({"scoring": "fresh"}, pretrained=True)
    assert (fresh.preset, fresh.signal, fresh.scoring, fresh.prior) == ("finetune", "truncation", "fresh", "fresh")


def test_the_built_in_models_own_directory_trains_from_scratch(tmp_path):
    """--model pointing at the built-in model as initialised (tests and demos pass its cached directory) keeps the
    from-scratch preset; a directory without the marker (a user's model, an export) is taken as pretrained."""
    from optbatch_ds.modeling import is_untrained, mark_untrained

    user = tmp_path / "user_model"
    user.mkdir()
    assert not is_untrained(str(user)) and not is_untrained(None)
    assert _optbatch_section(parse_args(["--deepspeed", "ds_configs/zero3.json", "--model", str(user)]), {}).preset \
        == "finetune"
    mark_untrained(str(user))
    assert is_untrained(str(user))
    assert _optbatch_section(parse_args(["--deepspeed", "ds_configs/zero3.json", "--model", str(user)]), {}).preset \
        == "default"


@pytest.mark.parametrize("method", ["random", "online_hard", "ccs", "infobatch"])
def test_baselines_rank_by_a_fresh_loss_unless_told_otherwise(method):
    cfg = OptBatchConfig.from_dict({"method": method})
    assert (cfg.signal, cfg.scoring) == ("loss", "fresh")
    cfg = OptBatchConfig.from_dict({"method": method}, pretrained=True)  # not the finetune preset's keys
    assert (cfg.signal, cfg.scoring, cfg.prior, cfg.strata) == ("loss", "fresh", "fresh", 3)
    cfg = OptBatchConfig.from_dict({"method": method, "signal": "progress", "scoring": "stale"})
    assert (cfg.signal, cfg.scoring) == ("progress", "stale")
    assert OptBatchConfig.from_dict({"method": "optbatch"}).signal == "neighbours"


@pytest.mark.parametrize("section,match", [
    ({"prune_ratio": 1.0}, "outside"), ({"prune_ratio": -0.1}, "outside"), ({"method": "optbach"}, "did you mean 'optbatch'"),
    ({"strata": 0}, "strata"), ({"temperature": 0}, "temperature"), ({"feature": "grad"}, "feature"),
    ({"sketch_dim": -1}, "sketch_dim"), ({"method": "random", "prune_ratio": 0.0}, "use method 'full'"),
    ({"temperature_end": 0}, "temperature_end"), ({"temperature_end": "cold"}, "temperature_end"),
    ({"reweight": "stratum"}, "did you mean 'strata'"),
])
def test_bad_optbatch_values(section, match):
    with pytest.raises(ConfigError, match=match):
        OptBatchConfig.from_dict(section)


def test_schedule_and_reweight_reach_the_selection_config():
    sc = OptBatchConfig.from_dict({"temperature_end": "inf", "reweight": "strata"}).selection_config()
    assert sc.temperature_end == math.inf and sc.reweight == "strata"
    assert sc.inverse_temperature(0.0) == 1.0 and sc.inverse_temperature(1.0) == 0.0
    sc = OptBatchConfig.from_dict({"temperature_end": -1}).selection_config()
    assert sc.inverse_temperature(0.5) == 0.0 and sc.inverse_temperature(1.0) == -1.0


def test_more_strata_than_candidates():
    with pytest.raises(ConfigError, match="more than the 24 candidates"):
        resolve(RunConfig(), 2, raw=_ds(optbatch={"strata": 25}))


def test_flags_override_json_and_unknown_flag():
    run = parse_args(["--deepspeed", "ds_configs/zero3.json", "--method", "random", "--prune-ratio", "0.5",
                      "--local_rank=1"])
    rs = resolve(run, 2)
    assert rs.optbatch.method == "random" and rs.optbatch.prune_ratio == 0.5 and rs.candidates == 32
    with pytest.raises(ConfigError, match="did you mean '--prune-ratio'"):
        parse_args(["--prune-ration", "0.3"])
    with pytest.raises(ConfigError, match="on-bad-record"):
        parse_args(["--on-bad-record", "ignore"])


def test_full_method_means_no_pruning():
    rs = resolve(RunConfig(method="full"), 2)
    assert rs.optbatch.prune_ratio == 0.0 and rs.candidates == rs.train_batch_size


def test_planned_steps():
    run = RunConfig(epochs=2)
    assert planned_steps(run, 100, 24) == 8
    assert planned_steps(RunConfig(max_steps=3), 100, 24) == 3
    with pytest.raises(ConfigError, match="fewer than"):
        planned_steps(run, 10, 24)


def test_bad_json_names_line(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{\n "train_batch_size": 16,\n oops\n}')
    with pytest.raises(ConfigError, match=r"ds.json:3"):
        resolve(RunConfig(deepspeed=str(p)), 2)


def test_each_optbatch_key_is_declared_once_and_composed():
    """OptBatchConfig's keys are SelectionConfig's and ScoringConfig's plus prune_ratio: nothing copied by hand."""
    from dataclasses import fields

    from optbatch_ds.scoring import ScoringConfig
    from optbatch_ds.selection import SelectionConfig

    from optbatch_ds.signals import SignalConfig

    own = {f.name for f in fields(OptBatchConfig)}
    sel, sco = {f.name for f in fields(SelectionConfig)}, {f.name for f in fields(ScoringConfig)}
    sig = {f.name for f in fields(SignalConfig)}
    assert own == sel | sco | sig | {"prune_ratio", "preset"} and not (sel & sco or sel & sig or sco & sig)
    ob = OptBatchConfig.from_dict({"method": "ccs", "strata": 5, "sketch_dim": 64, "outlier_fence": 1.5})
    assert ob.selection_config() == SelectionConfig(method="ccs", strata=5, outlier_fence=1.5)
    # one validator per key, one message format, whichever class is built
    for cls in (OptBatchConfig, SelectionConfig):
        with pytest.raises(ConfigError, match=r'^"optbatch"\.quotas: \'exp\' is not one of exp_loss, uniform; '
                                              r"did you mean 'exp_loss'\?$"):
            cls(quotas="exp")


def test_readme_optbatch_table_is_generated_from_the_declarations():
    """The README's "optbatch" table is `config.optbatch_table()`: every key, its real default and its help text,
    so the docs cannot drift from the code (regenerate with `python -m optbatch_ds.config`)."""
    from dataclasses import fields

    from optbatch_ds.config import optbatch_table

    table = optbatch_table()
    assert table in open("README.md", encoding="utf-8").read()
    keys = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert sorted(keys) == sorted(f.name for f in fields(OptBatchConfig))
    assert "| `score_batch_size` | 0 | Samples per scoring forward; 0 = 2 x train_micro_batch_size_per_gpu" in table


def test_run_config_is_checked_on_creation():
    with pytest.raises(ConfigError, match=r"unknown value 'ignore' \(--on-bad-record\); choose one of error, skip"):
        RunConfig(on_bad_record="ignore")
    with pytest.raises(ConfigError, match=r"unknown data format 'alpacca' \(--data-format\).*did you mean 'alpaca'"):
        RunConfig(data_format="alpacca")
    with pytest.raises(ConfigError, match="--max-seq-len 4 is too small"):
        RunConfig(max_seq_len=4)
    with pytest.raises(ConfigError, match="--resume /no/such/dir: no such checkpoint"):
        RunConfig(resume="/no/such/dir")
    assert RunConfig(resume="auto", epochs=0.5).epochs == 0.5


def test_fit_flags_follow_trl_names_and_are_checked():
    """--use-peft / --lora-* / --gradient-checkpointing / --attn-implementation / --export / --report-to parse as TRL
    and transformers spell them; checkpointing defaults on with --model and off for the built-in model."""
    run = parse_args(["--model", "m", "--use-peft", "--lora-r", "8", "--lora-target-modules", "q_proj", "v_proj,o_proj",
                      "--lora-modules-to-save", "lm_head", "--attn-implementation", "sdpa", "--no-merge-lora",
                      "--save-total-limit", "2", "--eval-every", "5", "--export", "best", "--report-to", "tensorboard"])
    assert run.gradient_checkpointing is True and run.lora_r == 8 and run.merge_lora is False
    assert run.lora_target_modules == ("q_proj", "v_proj", "o_proj") and run.lora_modules_to_save == ("lm_head",)
    assert (run.attn_implementation, run.export, run.report_to, run.save_total_limit) == ("sdpa", "best",
                                                                                         "tensorboard", 2)
    assert parse_args([]).gradient_checkpointing is False and parse_args([]).lora_target_modules == ("all-linear",)
    assert parse_args(["--model", "m", "--no-gradient-checkpointing"]).gradient_checkpointing is False
    assert parse_args(["--no-export"]).export == "none"


@pytest.mark.parametrize("argv,match", [
    (["--attn-implementation", "flash_attention"], "did you mean 'flash_attention_2'"),
    (["--load-in-4bit"], "add --use-peft"),
    (["--export", "best"], "add --eval-every"),
    (["--early-stopping-patience", "2"], "add --eval-every"),
    (["--use-peft", "--lora-r", "0"], "must be positive"),
    (["--save-total-limit", "-1"], "must be >= 0"),
    (["--report-to", "mlflow"], "choose one of none, tensorboard, wandb"),
])
def test_fit_flag_mistakes(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_machine_checks_run_before_loading(monkeypatch):
    """A missing flash-attn suggests sdpa; 4-bit on a machine without CUDA is refused; both before any model loads."""
    import importlib.util

    from optbatch_ds.modeling import check_environment

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the flash-attn package.*sdpa"):
        check_environment(RunConfig(attn_implementation="flash_attention_2"), "cuda")
    with pytest.raises(ConfigError, match="CUDA GPUs only.*--use-peft without it"):
        check_environment(RunConfig(use_peft=True, load_in_4bit=True), "cpu")
    with pytest.raises(ConfigError, match="CUDA GPUs only; on this cpu machine use --attn-implementation sdpa"):
        check_environment(RunConfig(attn_implementation="flash_attention_2"), "cpu")  # not "pip install flash-attn"
    check_environment(RunConfig(use_peft=True, attn_implementation="sdpa"), "cpu")  # fine on CPU
