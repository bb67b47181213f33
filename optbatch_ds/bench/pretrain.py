"""A pretrained base model for the fine-tuning regime of the benchmark (launch/pretrain_base.py), built once.

    path = pretrained_base("data/pretrain.jsonl", "data/train.jsonl", cache_dir="bench_out/pretrain", steps=600)

The base is the package's default model (modeling.new_default_model: DEFAULT_MODEL_CONFIG, a Llama, with a
SentencePiece tokenizer that carries the built-in chat template and role tokens), its tokenizer trained on the
corpus text plus the instruction records' texts, then pretrained on the corpus as plain causal-LM text: documents
as <s> text </s>, packed into fixed-length blocks, every token supervised, AdamW with warm-up and cosine decay, one
process. The directory is cached under cache_dir by a fingerprint of the corpus, the tokenizer texts, the model
config, the seed, the steps and the optimisation settings (modeling.build_once: atomic rename, safe when two
processes race), and holds `pretrain_log.json`: the loss curve (train and held-out blocks), the wall time and the
settings. Benchmark infrastructure, not the product: nothing of the core imports it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from optbatch_ds.data import DataError, load_examples
from optbatch_ds.errors import ConfigError
from optbatch_ds.modeling import DEFAULT_MODEL_CONFIG, DEFAULT_VOCAB_SIZE, build_once, fingerprint, new_default_model

LOG_FILE = "pretrain_log.json"
# The fine-tuning runs' --max-seq-len per data set (BENCHMARKS.md §7, §7b): pydoc's answers are paragraphs, and
# some of its prompts alone fill the package's default of 256 tokens
CHECK_SEQ_LEN = {"demo": 256, "pydoc": 512}


@dataclass(frozen=True)
class PretrainSpec:
    """How the base is pretrained. block_size and batch_size in tokens and blocks; learning rate peak of a linear
    warm-up over warmup_steps then a cosine decay to min_lr_ratio x peak; eval_fraction of the blocks is held out
    for the held-out loss, measured every log_every steps."""

    block_size: int = 256
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    eval_fraction: float = 0.02
    log_every: int = 50
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self):
        if min(self.block_size, self.batch_size, self.log_every) < 1 or self.learning_rate <= 0:
            raise ConfigError("block_size, batch_size and log_every must be at least 1 and learning_rate positive")
        if not 0 < self.eval_fraction < 0.5:
            raise ConfigError(f"eval_fraction must be in (0, 0.5), got {self.eval_fraction}")


def read_corpus(path: str) -> list[str]:
    """The "text" of every document of a pretraining corpus (JSONL, one {"text": ...} object per line).

    Raises ConfigError when the file cannot be read, DataError (file:line) for a line that is not a JSON object
    with a non-empty string "text", or when the file holds no document."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the pretraining corpus '{path}': {exc}") from exc
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            text = None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{n}", "text", "not a JSON object with a non-empty string \"text\"",
                            'one {"text": "..."} document per line', skippable=False)
        texts.append(text)
    if not texts:
        raise DataError(path, None, "the corpus holds no document", "at least one document", kind="no_records",
                        skippable=False)
    return texts


def pack_blocks(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """(n_blocks, block_size) int64: every document as bos + tokens + eos, concatenated and cut into blocks (the
    tail shorter than a block is dropped). Raises ConfigError when the corpus is shorter than one block."""
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *doc, tokenizer.eos_token_id]
    n = len(ids) // block_size
    if n < 2:
        raise ConfigError(f"the corpus has {len(ids)} tokens, fewer than two blocks of {block_size}: "
                          "use a larger corpus or a smaller block_size")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def _lr_factor(step: int, steps: int, spec: PretrainSpec) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): warm-up, then cosine decay."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, steps - spec.warmup_steps)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(n_blocks: int, batch_size: int, generator: torch.Generator):
    """Index tensors of batch_size blocks, epoch after epoch, each epoch a fresh seeded permutation."""
    while True:
        order = torch.randperm(n_blocks, generator=generator)
        for at in range(0, n_blocks - batch_size + 1, batch_size):
            yield order[at: at + batch_size]


@torch.no_grad()
def block_loss(model, blocks: torch.Tensor, batch_size: int, device) -> float:
    """Mean token NLL (nats) of the model over the blocks, every token supervised."""
    model.eval()
    total, n = 0.0, 0
    for at in range(0, len(blocks), batch_size):
        x = blocks[at: at + batch_size].to(device)
        total += model(input_ids=x, labels=x).loss.item() * x.numel()
        n += x.numel()
    model.train()
    return total / n


def pretrain(model, blocks: torch.Tensor, steps: int, spec: PretrainSpec, seed: int, device="cpu") -> dict:
    """Train `model` in place on the blocks for `steps` optimizer steps; returns the log: loss curve (mean train
    loss over each log_every interval, held-out loss), tokens, wall and CPU seconds (on a shared machine the
    process's CPU time is the honest cost: with one thread it is what the run takes on a free core). Prints one
    line per log."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=generator)
    n_eval = max(1, round(spec.eval_fraction * len(blocks)))
    held_out, train = blocks[order[:n_eval]], blocks[order[n_eval:]]
    batch_size = min(spec.batch_size, len(train))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95),
                            weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, spec))
    curve, running, start, cpu_start = [], [], time.time(), time.process_time()
    for step, idx in zip(range(1, steps + 1), _batches(len(train), batch_size, generator)):
        x = train[idx].to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step % spec.log_every == 0 or step == steps:
            point = {"step": step, "loss": sum(running) / len(running),
                     "eval_loss": block_loss(model, held_out, batch_size, device), "elapsed_s": time.time() - start,
                     "cpu_s": time.process_time() - cpu_start}
            curve.append(point)
            running = []
            print(f"pretrain step {step:5d} | loss {point['loss']:.4f} | held-out {point['eval_loss']:.4f} | "
                  f"lr {sched.get_last_lr()[0]:.2e} | {point['elapsed_s']:.0f} s wall, {point['cpu_s']:.0f} s CPU",
                  flush=True)
    return {"steps": steps, "wall_s": time.time() - start, "cpu_s": time.process_time() - cpu_start,
            "tokens_seen": steps * batch_size * spec.block_size,
            "train_blocks": len(train), "eval_blocks": n_eval, "corpus_tokens": blocks.numel(), "curve": curve,
            "final_loss": curve[-1]["loss"] if curve else None,
            "final_eval_loss": curve[-1]["eval_loss"] if curve else None}


def pretrained_base(corpus_path: str, sft_train_path: str, cache_dir: str, seed: int = 0, steps: int = 600,
                    spec: PretrainSpec | None = None, device="cpu") -> str:
    """The directory of the base model pretrained on the corpus (built on the first call, then cached).

    corpus_path: JSONL of {"text": ...} documents (read_corpus); sft_train_path: the instruction records whose
    texts the tokenizer must also cover (any format load_examples reads). Returns a Hugging Face model directory
    (AutoModelForCausalLM / AutoTokenizer load it) with pretrain_log.json. Raises ConfigError / DataError for an
    unreadable corpus or records, ConfigError for steps < 1."""
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    spec = spec or PretrainSpec()
    corpus = read_corpus(corpus_path)
    tokenizer_texts = corpus + [m["content"] for e in load_examples(sft_train_path) for m in e.messages]
    settings = {"model": DEFAULT_MODEL_CONFIG, "steps": steps, "n_corpus_docs": len(corpus), **asdict(spec)}
    key = fingerprint(tokenizer_texts, seed, settings)
    target = os.path.join(cache_dir, f"pretrained_base_{key}")
    if os.path.exists(os.path.join(target, "config.json")):
        log = _read_log(target)
        print(f"pretrained base (cached): {target} | {log.get('steps')} steps in {log.get('wall_s', 0):.0f} s wall "
              f"({log.get('cpu_s', 0):.0f} s CPU) | final loss {log.get('final_loss')}", flush=True)
        return target

    def build(tmp: str) -> None:
        model, tokenizer = new_default_model(tokenizer_texts, tmp, seed, spec.vocab_size, DEFAULT_MODEL_CONFIG)
        blocks = pack_blocks(corpus, tokenizer, spec.block_size)
        log = pretrain(model, blocks, steps, spec, seed, device)
        log.update(seed=seed, spec=asdict(spec), corpus=os.path.abspath(corpus_path),
                   sft_train=os.path.abspath(sft_train_path), torch=torch.__version__, device=str(device))
        model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, LOG_FILE), "w") as f:
            json.dump(log, f, indent=1)

    return build_once(target, build)


def _read_log(model_dir: str) -> dict:
    try:
        with open(os.path.join(model_dir, LOG_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _dataset(name: str, out: str, seed: int) -> dict:
    """Generate the named instruction set (with its corpus) under out/<name>_data; returns make_*_data's dict."""
    target = os.path.join(out, f"{name}_data")
    if name == "demo":
        from optbatch_ds.data.demo import make_demo_data
        return make_demo_data(target, seed=seed)
    from optbatch_ds.data.pydoc_demo import make_pydoc_data
    return make_pydoc_data(target, seed=seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/pretrain_base.py", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("demo", "pydoc"), default="demo")
    p.add_argument("--out", default="bench_out/pretrain", help="data under OUT/<dataset>_data, base models in OUT")
    p.add_argument("--seed", type=int, default=0, help="data and model seed")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=PretrainSpec.batch_size, help="blocks per step")
    p.add_argument("--learning-rate", type=float, default=PretrainSpec.learning_rate)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda where there is one")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="score correct against wrong answers of the train records with the base and a from-scratch "
                        "model, as they are and after a chat warm-up on the reference split (answer_nll.check)")
    p.add_argument("--warmup-steps", type=int, default=50, help="chat warm-up steps of the check")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="token limit of the check's records, as the fine-tuning runs' --max-seq-len; default: "
                        + ", ".join(f"{k} {v}" for k, v in CHECK_SEQ_LEN.items()))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _dataset(args.dataset, args.out, args.seed)
    spec = PretrainSpec(batch_size=args.batch_size, learning_rate=args.learning_rate)
    path = pretrained_base(data["pretrain"], data["train"], args.out, args.seed, args.steps, spec, args.device)
    log = _read_log(path)
    print(f"base: {path}\nwall {log.get('wall_s', 0):.0f} s | CPU {log.get('cpu_s', 0):.0f} s | "
          f"final loss {log.get('final_loss'):.4f} | "
          f"held-out {log.get('final_eval_loss'):.4f} | corpus {log.get('corpus_tokens')} tokens")
    if args.check:
        from optbatch_ds.bench.answer_nll import check, format_table

        results = check(path, data["train"], data["reference"], (0, args.warmup_steps), args.seed, args.device,
                        args.max_seq_len or CHECK_SEQ_LEN[args.dataset])
        with open(os.path.join(args.out, f"answer_nll_{args.dataset}.json"), "w") as f:
            json.dump({"model": path, "warmup_steps": args.warmup_steps, **results}, f, indent=1)
        for label, result in results.items():
            print(format_table(result, title=label) + "\n")
    return 0
