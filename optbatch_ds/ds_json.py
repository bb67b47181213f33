"""The DeepSpeed JSON as Hugging Face users write it: "auto" values, missing sections, precision.

`config.resolve` calls these before any data or model is loaded, so a config the run cannot start with
fails in seconds:

    add_missing_sections(ds)                      # no "optimizer" / "scheduler": Hugging Face's defaults
    fill_hf_autos(path, ds, hidden_size)          # gradient_clipping, optimizer betas / eps / weight_decay, buckets
    check_precision(path, ds, accelerator, bf16_supported, fp16_supported)
    check_no_auto_left(path, ds)                  # any "auto" nothing resolved: a ConfigError naming its key

Every "auto" that transformers' `HfTrainerDeepSpeedConfig` fills is filled here the way it fills it with
`TrainingArguments` defaults (`AUTO_VALUES`, the README's table); the batch sizes, lr, scheduler steps and
precision are filled in config.py from the run's own flags.
"""
from __future__ import annotations

import json
import os

from optbatch_ds.errors import ConfigError

HF_ADAM = {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}  # TrainingArguments' adam_beta1/2, adam_epsilon
HF_MAX_GRAD_NORM = 1.0
BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")

# (key, what "auto" becomes): the README's table; tests/unit/test_ds_json.py checks both.
AUTO_VALUES = (
    ("train_batch_size", "train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size"),
    ("train_micro_batch_size_per_gpu", "4, or train_batch_size / (gradient_accumulation_steps x world size)"),
    ("gradient_accumulation_steps", "1, or train_batch_size / (train_micro_batch_size_per_gpu x world size)"),
    ("gradient_clipping", "1.0 (Hugging Face's max_grad_norm)"),
    ("optimizer.params.lr", "--learning-rate; else 1e-3 for the built-in model, 2e-5 for a --model"),
    ("optimizer.params.betas", "[0.9, 0.999]"),
    ("optimizer.params.eps", "1e-08"),
    ("optimizer.params.weight_decay", "0.0"),
    ("scheduler.params.warmup_min_lr", "0.0"),
    ("scheduler.params.warmup_max_lr", "the optimizer's lr"),
    ("scheduler.params.warmup_num_steps", "5% of the planned steps (at least 1)"),
    ("scheduler.params.total_num_steps", "the planned steps (--max-steps, else epochs x pools per epoch)"),
    ("bf16.enabled", "true where the accelerator has bf16 (GPUs), false on CPU"),
    ("fp16.enabled", "false"),
    ("zero_optimization.reduce_bucket_size", "hidden_size x hidden_size (the model's config.json)"),
    ("zero_optimization.stage3_prefetch_bucket_size", "0.9 x hidden_size x hidden_size"),
    ("zero_optimization.stage3_param_persistence_threshold", "10 x hidden_size"),
)
# What a config without these sections gets (as Hugging Face's Trainer, which builds AdamW and a linear
# schedule itself when DeepSpeed's config has none); the "auto"s are then filled as above.
DEFAULT_SECTIONS = {
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto",
                                                      "warmup_type": "linear"}},
}


def is_auto(value) -> bool:
    """Whether a JSON value is the string "auto" (any case)."""
    return isinstance(value, str) and value.lower() == "auto"


def auto_table() -> str:
    """The README's table of the "auto" values (`python -m optbatch_ds.ds_json`)."""
    rows = ["| key | `\"auto\"` becomes |", "|---|---|"]
    rows += [f"| `{key}` | {what} |" for key, what in AUTO_VALUES]
    return "\n".join(rows)


def add_missing_sections(ds: dict) -> list[str]:
    """Give a config without an optimizer or scheduler section Hugging Face's defaults; returns what was added
    (recorded in config.json). A section that is not a JSON object is a ConfigError."""
    added = []
    for key, default in DEFAULT_SECTIONS.items():
        if ds.get(key) is None:
            ds[key] = json.loads(json.dumps(default))
            added.append(key)
        elif not isinstance(ds[key], dict):
            raise ConfigError(f'"{key}" must be a JSON object like {json.dumps(default)}, got {ds[key]!r}')
    return added


def fill_hf_autos(path: str, ds: dict, hidden_size: int | None) -> None:
    """gradient_clipping, the optimizer's betas / eps / weight_decay and the ZeRO bucket sizes, as
    `HfTrainerDeepSpeedConfig` fills them (the bucket sizes from the model's hidden size, at every ZeRO stage:
    stage3_* keys do nothing below stage 3)."""
    if is_auto(ds.get("gradient_clipping")):
        ds["gradient_clipping"] = HF_MAX_GRAD_NORM
    params = (ds.get("optimizer") or {}).get("params")
    if isinstance(params, dict):
        for key, value in HF_ADAM.items():
            if is_auto(params.get(key)):
                params[key] = list(value) if isinstance(value, list) else value
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    autos = [k for k in BUCKET_KEYS if is_auto(zero.get(k))]
    if autos and hidden_size is None:
        raise ConfigError(f"{path}: zero_optimization.{autos[0]} is \"auto\", which is filled from the model's "
                          "hidden size, but the model's config.json has neither hidden_size nor hidden_sizes; "
                          "set an integer")
    for key in autos:
        zero[key] = {"reduce_bucket_size": hidden_size * hidden_size,
                     "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                     "stage3_param_persistence_threshold": 10 * hidden_size}[key]


def needs_hidden_size(ds: dict) -> bool:
    """Whether a bucket size is "auto" (reading the model's config is needed only then)."""
    zero = ds.get("zero_optimization")
    return isinstance(zero, dict) and any(is_auto(zero.get(k)) for k in BUCKET_KEYS)


def model_hidden_size(model: str | None, trust_remote_code: bool = False) -> int | None:
    """The hidden size HF's integration would use: config.json's hidden_size, else the largest of hidden_sizes,
    else the text_config's; the built-in model's without --model. Reads the config only, never the weights."""
    if model is None:
        from optbatch_ds.modeling import DEFAULT_MODEL_CONFIG

        return int(DEFAULT_MODEL_CONFIG["hidden_size"])
    cfg = None
    if os.path.isfile(os.path.join(model, "config.json")):
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).to_dict()
        except (OSError, ValueError, ImportError, KeyError) as exc:
            raise ConfigError(f"could not read the config of model '{model}' (needed for the \"auto\" bucket sizes "
                              f"of the DeepSpeed config): {exc}") from exc
    for section in (cfg, cfg.get("text_config") or {}):
        if isinstance(section.get("hidden_size"), int):
            return section["hidden_size"]
        if section.get("hidden_sizes"):
            return int(max(section["hidden_sizes"]))
    return None


def check_precision(path: str, ds: dict, accelerator: str, bf16_supported: bool, fp16_supported: bool) -> None:
    """A precision the machine cannot train in is a ConfigError naming the key, before anything is loaded:
    fp16 on the CPU (DeepSpeed's fp16 mixed precision with loss scaling is a GPU mode; CPUs train in bf16 or
    fp32), fp16 or bf16 on an accelerator without it, or both at once."""
    bf16 = (ds.get("bf16") or {}).get("enabled") is True
    fp16 = (ds.get("fp16") or {}).get("enabled") is True
    if bf16 and fp16:
        raise ConfigError(f"{path}: bf16 and fp16 are both enabled; enable one")
    if fp16 and (accelerator == "cpu" or not fp16_supported):
        where = ("this machine trains on the CPU" if accelerator == "cpu"
                 else f"the {accelerator} accelerator has no fp16")
        raise ConfigError(f'{path}: fp16.enabled is true, but {where}; set "fp16": {{"enabled": false}} and use '
                          '"bf16": {"enabled": "auto"} (bf16 where the hardware has it, else fp32)')
    if bf16 and not bf16_supported:
        raise ConfigError(f'{path}: bf16.enabled is true, but the {accelerator} accelerator has no bf16; set it to '
                          '"auto" (bf16 where the hardware has it, else fp32)')
    for key in ("bf16", "fp16"):
        value = (ds.get(key) or {}).get("enabled")
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f'{path}: {key}.enabled is {value!r}; expected true, false or "auto"')


def check_no_auto_left(path: str, ds, prefix: str = "") -> None:
    """Every "auto" must have been filled: one left would reach DeepSpeed, which drops it silently (its default)
    or crashes on it after the model is loaded."""
    items = ds.items() if isinstance(ds, dict) else enumerate(ds) if isinstance(ds, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix and isinstance(key, str) else f"{prefix}[{key}]" if prefix else str(key)
        if is_auto(value):
            known = ", ".join(k for k, _ in AUTO_VALUES)
            raise ConfigError(f'{path}: {name} is "auto", which nothing fills (Hugging Face\'s integration fills '
                              f"only {known}); set a value")
        check_no_auto_left(path, value, name)


if __name__ == "__main__":  # print the README's table of "auto" values
    print(auto_table())
