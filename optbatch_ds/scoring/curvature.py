"""The curvature of DESIGN §2 step 2: Adam's second moment of the output layer, read through DeepSpeed.

    inv_sqrt_v = curvature_inv_sqrt(engine, eps=1e-8)   # (V, d) float32 or None; collective

Reads the optimizer state only through DeepSpeed's public accessor (ZeRO-1/2/3 partitions included,
"shard-level Hessian products"), never its private attributes.
"""
from __future__ import annotations

import logging

import torch

from optbatch_ds import comm
from optbatch_ds.errors import ConfigError

logger = logging.getLogger(__name__)
_warned: set = set()
_steps_without_state: dict[int, int] = {}


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _note_no_step(optimizer) -> None:
    """Before the first optimizer step there is no curvature (DESIGN §2: v = 1); still none a call later is worth
    saying, never silent: selection is running on the raw gradient."""
    calls = _steps_without_state[id(optimizer)] = _steps_without_state.get(id(optimizer), 0) + 1
    if calls == 2:
        _warn_once(f"nostep{id(optimizer)}", f"{type(optimizer).__name__} reports no Adam step yet after {calls} "
                   "selection steps: the curvature is not available and selection uses the raw output-layer gradient "
                   "until it is")


def curvature_inv_sqrt(engine, eps: float) -> torch.Tensor | None:
    """1 / sqrt(v_hat + eps) for the output layer's weight: (V, d) float32, full, identical on every rank.

    v_hat = exp_avg_sq / (1 - beta2 ** step) is Adam's bias-corrected second moment of
    `engine.module.get_output_embeddings().weight` (`max_exp_avg_sq` under amsgrad; no correction for
    optimizers run with bias_correction=False). With tied input/output embeddings (GPT-2) that weight
    is the same Parameter as the input embedding and its Adam state mixes both roles' gradients: it is
    used as it is, being what the optimizer divides the output layer's update by.

    Returns None before the first optimizer step (no Adam state yet: use the raw gradient) and for a
    frozen output layer. Collective: every rank of the data-parallel group must call it, since
    DeepSpeed assembles the state from the ranks' partitions (all-reduce under ZeRO-1/2, all-gather
    under ZeRO-3), plus one all-reduce here that checks all ranks count the same optimizer step.
    The state is read through `deepspeed.utils.safe_get_full_optimizer_state` (ZeRO-1/2/3, fp32 or
    bf16); without ZeRO, where that accessor returns None, from the torch optimizer's own state for the
    Parameter (fp32 only: with bf16/fp16 and no ZeRO DeepSpeed keeps the state on fp32 master copies it
    does not expose, and this raises). Result on the accelerator device (CPU under the CPU accelerator).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if optimizer is None:
        raise ConfigError("curvature_inv_sqrt needs a DeepSpeed engine built with an optimizer "
                          "(an Adam-family optimizer in the DeepSpeed config or passed to deepspeed.initialize)")
    weight = engine.module.get_output_embeddings().weight
    if not weight.requires_grad:
        _warn_once("frozen", "the output layer is frozen: it has no Adam state, so selection uses the raw "
                   "output-layer gradient (no curvature normalisation)")
        return None
    state, groups = _adam_state_and_groups(optimizer)
    step, group = _adam_step_and_group(state, groups, weight)
    step = comm.same_on_every_rank(step, "the optimizer step count")
    if step == 0:
        # Must be decided before the accessor: under ZeRO-1/2 it raises on the rank that owns the
        # fragment while the others wait in its all-reduce (a hang), and under ZeRO-3 it raises KeyError.
        _note_no_step(optimizer)
        return None
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    # After load_checkpoint, ZeRO-1/2 link the loaded Adam state to the parameters' fragments only
    # inside their next step(); the public accessor would find no state. This is DeepSpeed's own
    # idempotent linking call (the one step() makes), so reading works right after a resume too.
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if callable(link):
        link()
    v = safe_get_full_optimizer_state(weight, key)
    if v is None:  # no ZeRO, no bf16 optimizer: the torch optimizer keys its state by the Parameter
        own = state.get(weight, {}) if hasattr(state, "get") else {}
        if key not in own:
            raise ConfigError(
                f"found no Adam '{key}' for the output layer weight in {type(optimizer).__name__}: without "
                "ZeRO, fp16/bf16 training keeps Adam's state on fp32 master copies that DeepSpeed's accessors "
                "do not expose; use ZeRO stage 1, 2 or 3 (or fp32 without ZeRO) with an Adam-family optimizer")
        v = own[key]
    shape = tuple(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3: weight.shape is (0,) when partitioned
    v = v.detach().to(torch.float32).reshape(shape)
    if group.get("bias_correction", True):
        beta2 = float(group["betas"][1])
        v = v / (1.0 - beta2 ** step)
    return (v + float(eps)).rsqrt_()


def _adam_state_and_groups(optimizer):
    """(state, param_groups) of the torch optimizer doing the Adam update. DeepSpeed's ZeRO and fp16
    wrappers expose them as properties; the bf16 optimizer only holds the torch optimizer as .optimizer."""
    for opt in (optimizer, getattr(optimizer, "optimizer", None)):
        if opt is not None and hasattr(opt, "state") and hasattr(opt, "param_groups"):
            return opt.state, opt.param_groups
    raise ConfigError(f"cannot find the optimizer state behind {type(optimizer).__name__}")


def _adam_step_and_group(state, groups, weight) -> tuple[int, dict]:
    """Adam's step count and the param-group settings (betas, amsgrad, ...) that apply to `weight`.

    Without ZeRO the torch optimizer holds `weight` itself; under ZeRO its state is keyed by the ranks'
    flat fp32 partitions, which all step together, so their largest step is the count (FusedAdam of old
    kept it in the param group). The group is the one holding `weight`, or, under ZeRO where the groups
    hold flat partitions, any group when all agree on betas / amsgrad / bias_correction.
    """
    if not all(g.get("betas") for g in groups):
        raise ConfigError("an optimizer param group has no 'betas': curvature_inv_sqrt needs an Adam-family "
                          "optimizer (Adam, AdamW, FusedAdam, DeepSpeedCPUAdam)")
    own = state.get(weight) if hasattr(state, "get") else None
    holding = [g for g in groups if any(p is weight for p in g["params"])]
    entries = [own] if own else list(state.values())
    if own and holding:
        # DeepSpeed's FusedAdam (no ZeRO) counts a group's steps on the state of the last parameter it updated
        # and applies that count to the whole group; with tied embeddings the output layer is the group's first
        # parameter and its own count stays 0. The group's largest count is the one its update used.
        entries = [state[p] for p in holding[0]["params"] if p in state]
    steps = [int(round(float(e["step"]))) for e in entries if "step" in e]
    steps += [int(g["step"]) for g in groups if "step" in g]
    if holding:
        return max(steps, default=0), holding[0]
    settings = {(tuple(g.get("betas", ())), bool(g.get("amsgrad", False)), bool(g.get("bias_correction", True)))
                for g in groups}
    if len(settings) != 1:
        raise ConfigError(f"the optimizer's param groups disagree on Adam settings {sorted(settings)} and the "
                          "output layer's group cannot be told apart under ZeRO; use one betas setting")
    return max(steps, default=0), groups[0]
