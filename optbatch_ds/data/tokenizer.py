"""Train a small SentencePiece tokenizer and save it as a transformers tokenizer directory.

    tok = train_sentencepiece_tokenizer(texts, "out/tokenizer", vocab_size=1024)
    tok = AutoTokenizer.from_pretrained("out/tokenizer")   # the same tokenizer, later

How (transformers 5): SentencePiece trains a BPE model with byte fallback; LlamaTokenizer
converts the .model file into a `tokenizers` backend (`from_pretrained` on a folder holding
`tokenizer.model`; the constructor's `vocab_file=` alone does not load it); that backend is
wrapped in a plain `TokenizersBackend` (= PreTrainedTokenizerFast) and saved as tokenizer.json,
so loading it back never depends on LlamaTokenizer's defaults. `legacy=True` makes the Metaspace
pre-tokenizer prepend "▁" to every piece of text between control tokens ("always"), so a word
is the same token after "<|assistant|>" as inside a sentence (with "first" it would not be).

Tokens: <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3, then the pieces, then the role tokens
<|system|>, <|user|>, <|assistant|> of the built-in chat template (special: decode with
skip_special_tokens=True drops them). The built-in chat template is set. Digits are split one
per token. `len(tokenizer)` is the vocabulary size to give the model; it is at most
`vocab_size` (SentencePiece may stop early on a small corpus).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

from .templates import BUILTIN_CHAT_TEMPLATE, ROLE_TOKENS

SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
MIN_VOCAB = 384  # 256 byte pieces + 4 specials + 3 role tokens + the characters of the corpus


def train_sentencepiece_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 1024):
    """Train on `texts` (newlines split sentences) and save to `out_dir`; returns the loaded tokenizer."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (256 byte-fallback pieces, special "
                         f"tokens and the corpus characters), got {vocab_size}")
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    if not lines:
        raise ValueError("no text to train the tokenizer on")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=os.path.join(tmp, "tokenizer"),
            vocab_size=vocab_size - len(ROLE_TOKENS), hard_vocab_limit=False, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True, split_digits=True,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            num_threads=max(1, min(4, os.cpu_count() or 1)), minloglevel=2)
        llama = LlamaTokenizer.from_pretrained(tmp, legacy=True, local_files_only=True)
        tok = PreTrainedTokenizerFast(tokenizer_object=llama.backend_tokenizer, **SPECIAL)
    tok.add_special_tokens({"extra_special_tokens": list(ROLE_TOKENS)})
    tok.chat_template = BUILTIN_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
