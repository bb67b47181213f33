"""Load any Hugging Face causal LM + tokenizer, or build the small default (DESIGN §5).

The default is not a special code path: it is built once (a small LlamaForCausalLM from a
LlamaConfig plus a SentencePiece tokenizer trained on the training text), saved as an ordinary
HF model directory in a cache beside the output, and from then on loaded like a user's model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile

import torch

from optbatch_ds.errors import ConfigError
from optbatch_ds.run_options import ModelOptions

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)

# What loading a model or tokenizer from a wrong path, an offline hub id or unknown custom code raises;
# anything else (out of memory, a bug in remote code) is not a user's path mistake and keeps its traceback.
_LOAD_ERRORS = (OSError, ValueError, ImportError, KeyError)

DEFAULT_MODEL_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
DEFAULT_VOCAB_SIZE = 1024
# Sizes of the built-in architecture: "small" is the default model; "tiny" (~8x fewer non-embedding
# parameters) is for reference models (launch/reference.py), whose cost counts against the savings.
MODEL_SIZES = {
    "small": {},
    "mini": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=3, num_attention_heads=3,
                 num_key_value_heads=3),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2),
    "nano": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2),
}


def cache_root(output_dir: str) -> str:
    """`.optbatch_cache` beside the output directory, so several runs (a benchmark grid) share it."""
    return os.path.join(os.path.dirname(os.path.abspath(output_dir)) or ".", ".optbatch_cache")


def fingerprint(texts: list[str], seed: int, extra: dict) -> str:
    """16 hex digits identifying (texts, seed, extra): the cache key of a built model directory."""
    h = hashlib.sha256(json.dumps([extra, seed], sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_once(target: str, build) -> str:
    """Return `target` when it already holds a model directory (config.json); else call build(tmp) on a private
    temporary folder beside it and rename that into place. Safe when many ranks or processes race: each builds
    its own folder and the first to finish wins (the others' are identical and removed)."""
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".build_{socket.gethostname()}_{os.getpid()}_", dir=parent)
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another rank (or node) won the race: theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def new_default_model(texts: list[str], out_dir: str, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE,
                      model_config: dict | None = None):
    """(model, tokenizer): a SentencePiece tokenizer trained on `texts` (saved to out_dir, with the built-in chat
    template and role tokens) and a freshly initialised LlamaForCausalLM (seeded; DEFAULT_MODEL_CONFIG unless
    model_config is given) sized to it. The model is not saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optbatch_ds.data.tokenizer import train_sentencepiece_tokenizer

    tokenizer = train_sentencepiece_tokenizer(texts, out_dir, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **(model_config or DEFAULT_MODEL_CONFIG))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


UNTRAINED_MARKER = "optbatch_untrained.json"  # in the built-in model's directory: freshly initialised, never trained


def mark_untrained(model_dir: str) -> None:
    """Mark `model_dir` as a freshly initialised model (so --model with it trains from scratch: `is_untrained`)."""
    with open(os.path.join(model_dir, UNTRAINED_MARKER), "w", encoding="utf-8") as f:
        json.dump({"untrained": True, "note": "the built-in model as initialised by optbatch_ds; training it is "
                   "training from scratch (the 'default' preset, not 'finetune')"}, f)


def is_untrained(model_dir: str | None) -> bool:
    """Whether `model_dir` is the built-in model as initialised (it carries UNTRAINED_MARKER; a checkpoint or
    export of a trained model does not). False for None and for anything else, which is taken as pretrained."""
    return model_dir is not None and os.path.isfile(os.path.join(model_dir, UNTRAINED_MARKER))


def build_default_model(texts: list[str], cache_dir: str, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE,
                        config_overrides: dict | None = None) -> str:
    """Build (or reuse) the default model directory; returns its path. Safe to call from many ranks:
    each builds into a private temporary folder and the first to finish renames it into place."""
    from optbatch_ds.data.templates import BUILTIN_CHAT_TEMPLATE

    model_config = {**DEFAULT_MODEL_CONFIG, **(config_overrides or {})}
    # The template is part of the key: a cached tokenizer keeps the built-in template it was saved with.
    template = hashlib.sha256(BUILTIN_CHAT_TEMPLATE.encode()).hexdigest()[:8]
    key = fingerprint(texts, seed, {**model_config, "vocab": vocab_size, "template": template, "marked": 1})

    def build(tmp: str) -> None:
        model, tokenizer = new_default_model(texts, tmp, seed, vocab_size, model_config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        mark_untrained(tmp)

    return build_once(os.path.join(cache_dir, f"default_model_{key}"), build)


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str = "tokenizer"):
    """The tokenizer at `path`, with a pad token, and the chat template the run trains with set on it
    (`--chat-template`: tokenizer | builtin | chatml | PATH.jinja; see optbatch_ds.data.templates), so the loss
    masks, evaluation prompts and the export in final/ all use that one."""
    from transformers import AutoTokenizer

    from optbatch_ds.data.templates import resolve_chat_template

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:  # turn hub/offline failures into something a user can act on
        raise ConfigError(f"could not load a tokenizer from '{path}': {exc}. Pass a local model directory "
                         f"(nothing is downloaded at run time here) and --trust-remote-code for custom code.") from exc
    if tok.pad_token is None:
        # Padding positions are masked out of the loss and attention; any existing token will do.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ConfigError(f"tokenizer at '{path}' has no pad, eos or unk token to pad with")
    template, how = resolve_chat_template(chat_template, tok, path)
    if chat_template == "tokenizer" and not getattr(tok, "chat_template", None):
        logger.warning("chat template: %s", how)
    tok.chat_template = template
    return tok


def training_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed trains in: bf16 or fp16 when the (resolved) config enables it, else fp32."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32


def check_environment(options: ModelOptions, accelerator: str) -> None:
    """What the machine must offer for these flags, checked before anything loads (ConfigError, one line each):
    flash-attn for flash_attention_2, a CUDA GPU and bitsandbytes for --load-in-4bit, peft for --use-peft."""
    if options.attn_implementation == "flash_attention_2":
        if accelerator != "cuda":  # first: installing flash-attn would not help here
            raise ConfigError(f"--attn-implementation flash_attention_2 runs on CUDA GPUs only; on this {accelerator} "
                              "machine use --attn-implementation sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("--attn-implementation flash_attention_2 needs the flash-attn package (pip install "
                              "flash-attn --no-build-isolation); --attn-implementation sdpa needs nothing extra")
    if options.load_in_4bit:
        if accelerator != "cuda" or not torch.cuda.is_available():
            raise ConfigError("--load-in-4bit (QLoRA) quantizes with bitsandbytes on CUDA GPUs only; on this "
                              f"{accelerator} machine train LoRA on the unquantized base (--use-peft without it)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
    if options.use_peft and importlib.util.find_spec("peft") is None:
        raise ConfigError("--use-peft needs PEFT: pip install -e \".[peft]\" (or pip install peft)")


def _from_pretrained_kwargs(ds_config: dict, options: ModelOptions | None) -> dict:
    """dtype, attention kernel and (QLoRA) quantization settings for `from_pretrained`."""
    dtype = training_dtype(ds_config)
    kwargs: dict = {"dtype": dtype}
    if options is None:
        return kwargs
    if options.attn_implementation != "auto":
        kwargs["attn_implementation"] = options.attn_implementation
    if options.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = dtype if dtype != torch.float32 else torch.bfloat16
        # Under ZeRO-3 the packed 4-bit weights are stored in the training dtype, so DeepSpeed can partition
        # them like any other parameter (PEFT's "QLoRA with ZeRO-3" recipe: quant storage = model dtype).
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
        kwargs["dtype"] = compute
        if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
            kwargs["device_map"] = {"": torch.cuda.current_device()}  # ZeRO-0/1/2: quantize straight onto this GPU
    return kwargs


def load_model(path: str, ds_config: dict, trust_remote_code: bool = False, options: ModelOptions | None = None):
    """Load a causal LM for DeepSpeed, with the attention kernel, 4-bit quantization and activation checkpointing
    that `options` ask for (None: the model as saved). Under ZeRO-3 the weights are partitioned while loading
    (HfDeepSpeedConfig must stay alive, so it is returned with the model: (model, keep_alive)).
    Raises ConfigError for a path that holds no loadable model or a model without an lm_head."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    keep_alive = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     **_from_pretrained_kwargs(ds_config, options))
    except _LOAD_ERRORS as exc:
        raise ConfigError(f"could not load a causal LM from '{path}': {exc}. Pass a local HF model directory; "
                         f"add --trust-remote-code for models with custom code (ChatGLM).") from exc
    if model.get_output_embeddings() is None:
        raise ConfigError(f"model at '{path}' has no output embedding layer (lm_head); OptBatch scores "
                         f"samples through it, so a causal LM with an lm_head is required")
    return model, keep_alive


def zero3_fixes_frozen_recompute() -> bool:
    """Whether this DeepSpeed keeps frozen ZeRO-3 parameters gathered while a non-reentrant checkpoint recomputes
    (deepspeedai/DeepSpeed#8148); older versions fail in the backward with torch's CheckpointError (shape [0])."""
    try:
        from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
    except ImportError:
        return False
    return hasattr(coordinator, "update_recompute_parameters")


def enable_gradient_checkpointing(model, frozen_under_zero3: bool) -> bool:
    """transformers' activation checkpointing (`gradient_checkpointing_enable`, called `activation_checkpointing_enable`
    since transformers 5), non-reentrant (`use_reentrant=False`), on the training forward only
    (it is off in eval mode and under no_grad, so scoring forwards never recompute). Returns use_reentrant.

    With frozen parameters under ZeRO-3 (LoRA) and a DeepSpeed without the recompute fix, falls back to reentrant
    checkpointing with a warning, as TRL does: non-reentrant would fail in the first backward there."""
    reentrant = frozen_under_zero3 and not zero3_fixes_frozen_recompute()
    if reentrant:
        logger.warning("this DeepSpeed partitions frozen ZeRO-3 parameters during a checkpoint recompute "
                       "(deepspeedai/DeepSpeed#8148): using reentrant activation checkpointing; upgrade DeepSpeed "
                       "for the non-reentrant kind")
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for the same switch
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpoints pass gradients only to inputs that need them
    return reentrant


def attention_in_use(model) -> str:
    """The attention kernel the loaded model runs ("sdpa", "eager", "flash_attention_2", ...)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", "eager"))


def check_vocab(tokenizer, model, path: str) -> None:
    """A tokenizer with ids past the embedding table would crash deep inside the forward."""
    vocab = getattr(model.config, "vocab_size", None) or getattr(model.config, "padded_vocab_size", None)
    emb = model.get_input_embeddings()
    rows = getattr(getattr(emb, "weight", None), "ds_shape", None) or getattr(getattr(emb, "weight", None), "shape", None)
    limit = rows[0] if rows is not None else vocab
    if limit is not None and len(tokenizer) > limit:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model at '{path}' embeds only {limit}: "
                         f"they do not belong together (pass the tokenizer saved with this model)")
