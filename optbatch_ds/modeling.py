"""Load any Hugging Face causal LM + tokenizer, or build the small default (DESIGN §5).

The default is not a special code path: it is built once (a small LlamaForCausalLM from a
LlamaConfig plus a SentencePiece tokenizer trained on the training text), saved as an ordinary
HF model directory in a cache beside the output, and from then on loaded like a user's model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile

import torch

from optbatch_ds.errors import ConfigError

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


def build_default_model(texts: list[str], cache_dir: str, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE,
                        config_overrides: dict | None = None) -> str:
    """Build (or reuse) the default model directory; returns its path. Safe to call from many ranks:
    each builds into a private temporary folder and the first to finish renames it into place."""
    from optbatch_ds.data.templates import BUILTIN_CHAT_TEMPLATE

    model_config = {**DEFAULT_MODEL_CONFIG, **(config_overrides or {})}
    # The template is part of the key: a cached tokenizer keeps the built-in template it was saved with.
    template = hashlib.sha256(BUILTIN_CHAT_TEMPLATE.encode()).hexdigest()[:8]
    key = fingerprint(texts, seed, {**model_config, "vocab": vocab_size, "template": template})

    def build(tmp: str) -> None:
        model, tokenizer = new_default_model(texts, tmp, seed, vocab_size, model_config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

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


def load_model(path: str, ds_config: dict, trust_remote_code: bool = False):
    """Load a causal LM for DeepSpeed. Under ZeRO-3 the weights are partitioned while loading
    (HfDeepSpeedConfig must stay alive, so it is returned with the model)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    keep_alive = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise ConfigError(f"could not load a causal LM from '{path}': {exc}. Pass a local HF model directory; "
                         f"add --trust-remote-code for models with custom code (ChatGLM).") from exc
    if model.get_output_embeddings() is None:
        raise ConfigError(f"model at '{path}' has no output embedding layer (lm_head); OptBatch scores "
                         f"samples through it, so a causal LM with an lm_head is required")
    return model, keep_alive


def check_vocab(tokenizer, model, path: str) -> None:
    """A tokenizer with ids past the embedding table would crash deep inside the forward."""
    vocab = getattr(model.config, "vocab_size", None) or getattr(model.config, "padded_vocab_size", None)
    emb = model.get_input_embeddings()
    rows = getattr(getattr(emb, "weight", None), "ds_shape", None) or getattr(getattr(emb, "weight", None), "shape", None)
    limit = rows[0] if rows is not None else vocab
    if limit is not None and len(tokenizer) > limit:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model at '{path}' embeds only {limit}: "
                         f"they do not belong together (pass the tokenizer saved with this model)")
