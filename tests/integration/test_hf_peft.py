"""OptBatchTrainer with a PEFT (LoRA) model: the same curvature policy as launch/train.py, one process on CPU.

    python -m pytest tests/integration/test_hf_peft.py -q
"""
import pytest
import torch

from tests.distributed.test_hf_trainer import _rows

pytestmark = pytest.mark.integration


def _trainer(tmp_path, **optbatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from optbatch_ds.config import OptBatchConfig
    from optbatch_ds.hf_trainer import OptBatchTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    return OptBatchTrainer(model=model, args=args, train_dataset=_rows(), record_history=True,
                           optbatch=OptBatchConfig(sketch_dim=16, seed=3, **optbatch))


def test_a_frozen_lm_head_gets_the_ema_curvature_never_a_silent_raw_gradient(tmp_path):
    """auto resolves to ema for a LoRA model (lm_head has no Adam state); every step records the source, from the
    second step on with a statistic; selection.jsonl names it. Asking for adam is an error when training starts."""
    from tests.helpers import read_jsonl

    trainer = _trainer(tmp_path / "auto")
    trainer.train()
    history = trainer.optbatch_history
    assert [h["curvature_source"] for h in history] == ["ema"] * 3
    assert [h["curvature"] for h in history] == [False, True, True]
    lines = read_jsonl(tmp_path / "auto" / "selection.jsonl")
    assert [(l["curvature"], l["curvature_ready"]) for l in lines] == [("ema", False), ("ema", True), ("ema", True)]

    from optbatch_ds.errors import ConfigError

    with pytest.raises(ConfigError, match="frozen here"):
        _trainer(tmp_path / "adam", curvature="adam").train()
