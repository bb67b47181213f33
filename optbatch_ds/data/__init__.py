"""Data: formats (alpaca, sharegpt, messages), chat templates + loss mask, sampler, demo data.

    from optbatch_ds.data import load_examples, encode_examples, EpochSampler, SkipReport
    report = SkipReport()
    examples = load_examples("train.jsonl", on_bad_record="skip", report=report)
    encoded = encode_examples(examples, tokenizer, max_seq_len=256, on_bad_record="skip", report=report)
    report.write("out/skipped.json")

The tokenizer helper (optbatch_ds.data.tokenizer) and the demo generator (optbatch_ds.data.demo)
are imported from here too; transformers / datasets are imported only when they are used.
"""
from .chat import (BUILTIN_CHAT_TEMPLATE, IGNORE_INDEX, ChatTemplateError, Encoded, assistant_spans,
                   chat_template_of, encode_example, encode_examples, encode_prompt, split_for_generation,
                   stop_token_ids)
from .demo import make_demo_data
from .errors import DataError, SkipReport
from .formats import FORMATS, Example, detect_format, example_record, load_examples, parse_record
from .sampler import EpochSampler
from .templates import CHAT_TEMPLATE_CHOICES, CHATML_CHAT_TEMPLATE, resolve_chat_template
from .tokenizer import train_sentencepiece_tokenizer

__all__ = [
    "BUILTIN_CHAT_TEMPLATE", "CHATML_CHAT_TEMPLATE", "CHAT_TEMPLATE_CHOICES", "IGNORE_INDEX", "ChatTemplateError",
    "DataError", "Encoded", "EpochSampler",
    "Example", "FORMATS", "SkipReport", "assistant_spans", "chat_template_of", "detect_format",
    "encode_example", "encode_examples", "encode_prompt", "example_record", "load_examples", "make_demo_data",
    "parse_record",
    "resolve_chat_template", "split_for_generation", "stop_token_ids", "train_sentencepiece_tokenizer",
]
