"""Which per-sample signal tells a wrong answer from a hard one? Candidate signals computed from a run's
checkpoints, scored by ROC AUC on labelled data (launch/signal_study.py).

Run as:
    python launch/train.py --deepspeed ds_configs/bench_1rank.json --method full --save-every 187 --no-export \\
        --output-dir runs/study
    python launch/signal_study.py runs/study --steps 187,374,748,1122,1496

For every chosen checkpoint (ZeRO stage <= 2: the model states file holds the whole module) the model scores
every training record, and each candidate signal (higher = more worth training) is scored by
  AUC defective: P(signal of a wrong answer > signal of a clean record)        good when low
  AUC hard:      P(signal of a hard clean record > signal of an easy one)      good when high
("hard" clean records: first-checkpoint loss above the clean median). Candidates:
  loss          the record's loss (the paper's signal)
  pmi           how much the prompt helps the final answer: loss of the answer alone (no prompt) minus its
                loss after the prompt, per token. A right answer follows from its prompt; a misaligned one
                (another record's answer) does not.
  neighbours    minus the excess of the record's loss over the median loss of its 10 nearest records in the
                sketch space of DESIGN §2 (grad_raw features): a wrong answer is harder than records that look
                like it, a hard task's records are all hard
  progress      1 - loss / first-checkpoint loss
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from optbatch_ds.bench.analyze_run import roc_auc
from optbatch_ds.bench.io import WRONG_ANSWERS, read_json
from optbatch_ds.errors import ConfigError

K_NEIGHBOURS = 10


def _model(run_dir: str, step: int):
    """The run's model with the weights of checkpoint step_XXXXXX (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = read_json(os.path.join(run_dir, "config.json"))
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    tag = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    states = [f for f in os.listdir(tag) if f.endswith("model_states.pt")]
    if not states:
        raise ConfigError(f"{tag}: no model states file (a ZeRO stage <= 2 checkpoint is needed)")
    module = torch.load(os.path.join(tag, states[0]), map_location="cpu", weights_only=False)["module"]
    model.load_state_dict(module)
    return model.eval()


def _encoded(run_dir: str):
    """(examples, their Encoded, the Encoded of each record's final answer alone, the tokenizer)."""
    from optbatch_ds.data import SkipReport, encode_examples, load_examples
    from optbatch_ds.data.formats import Example
    from optbatch_ds.modeling import load_tokenizer

    cfg = read_json(os.path.join(run_dir, "config.json"))
    tok = load_tokenizer(cfg["model_path"], chat_template=cfg["run"].get("chat_template", "tokenizer"))
    examples = load_examples(cfg["train_data"])
    max_len = cfg["run"]["max_seq_len"]
    full = encode_examples(examples, tok, max_len, "skip", SkipReport())
    # the final answer after an empty user turn: the answer without its prompt
    answers = [Example(messages=[{"role": "user", "content": ""}, e.messages[-1]], task=e.task, source=e.source)
               for e in examples]
    alone = encode_examples(answers, tok, max_len, "skip", SkipReport())
    return examples, full, alone, tok


@torch.no_grad()
def _scores(model, items: list, pad_id: int, projection=None, batch: int = 64):
    """(per-sample loss (n,), sketches (n, k) or None) of `items` under `model`."""
    from optbatch_ds.batching import collate
    from optbatch_ds.scoring import LmHeadInput, output_layer_features, per_sample_loss

    losses, feats = [], []
    capture = LmHeadInput(model)
    try:
        for s in range(0, len(items), batch):
            b = collate(items[s:s + batch], pad_id, "cpu")
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            if projection is None:
                losses.append(per_sample_loss(out.logits, b["labels"]))
            else:
                loss, feat = output_layer_features(capture.value, out.logits, b["labels"], projection=projection)
                losses.append(loss)
                feats.append(feat)
    finally:
        capture.remove()
    return torch.cat(losses).numpy(), (torch.cat(feats).numpy() if feats else None)


def _last_turn_labels(enc):
    """Encoded with only the final assistant turn supervised (earlier assistant turns masked)."""
    labels = list(enc.labels)
    spans, inside = [], False
    for t, lab in enumerate(labels):
        if lab != -100 and not inside:
            spans.append([t, t])
            inside = True
        if lab != -100:
            spans[-1][1] = t
        if lab == -100:
            inside = False
    for a, b in spans[:-1]:
        labels[a:b + 1] = [-100] * (b - a + 1)
    return type("Item", (), {"input_ids": enc.input_ids, "labels": labels})()


def _neighbour_excess(loss: np.ndarray, sketches: np.ndarray) -> np.ndarray:
    """loss - median loss of the K nearest other records in sketch space (euclidean, after centring)."""
    x = sketches - sketches.mean(axis=0, keepdims=True)
    sq = (x * x).sum(1)
    out = np.empty(len(loss))
    for s in range(0, len(x), 512):
        d = sq[s:s + 512, None] - 2 * x[s:s + 512] @ x.T + sq[None, :]
        for r in range(d.shape[0]):
            d[r, s + r] = np.inf
        nn = np.argpartition(d, K_NEIGHBOURS, axis=1)[:, :K_NEIGHBOURS]
        out[s:s + 512] = loss[s:s + 512] - np.median(loss[nn], axis=1)
    return out


def study(run_dir: str, steps: list[int]) -> dict:
    from optbatch_ds.scoring import SketchProjection

    examples, full, alone, tok = _encoded(run_dir)
    ok = [i for i in range(len(examples)) if full[i] is not None and alone[i] is not None]
    defective = np.array([examples[i].meta.get("defect") in WRONG_ANSWERS for i in ok])
    last_items = [_last_turn_labels(full[i]) for i in ok]
    result, first = {"steps": steps, "signals": {}}, None
    for step in steps:
        model = _model(run_dir, step)
        vocab = model.get_output_embeddings().weight.shape[0]
        loss, sketches = _scores(model, [full[i] for i in ok], tok.pad_token_id, SketchProjection(vocab, 256, seed=0))
        cond, _ = _scores(model, last_items, tok.pad_token_id)
        uncond, _ = _scores(model, [alone[i] for i in ok], tok.pad_token_id)
        if first is None:
            first = loss.copy()
            clean = ~defective
            hard = clean & (first > np.median(first[clean]))
        signals = {"loss": loss, "pmi": uncond - cond, "neighbours": -_neighbour_excess(loss, sketches),
                   "progress": 1 - loss / first}
        for name, s in signals.items():
            entry = result["signals"].setdefault(name, {"defective": [], "hard": []})
            entry["defective"].append(roc_auc(s, defective))
            entry["hard"].append(roc_auc(s[clean], hard[clean]))
        print(f"step {step}: " + " | ".join(f"{n} {v['defective'][-1]:.3f}/{v['hard'][-1]:.3f}"
                                           for n, v in result["signals"].items()), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/signal_study.py", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="A launch/train.py output directory with ZeRO <= 2 checkpoints (--save-every).")
    p.add_argument("--steps", required=True, help="Comma-separated checkpoint steps, e.g. 187,374,748.")
    p.add_argument("--json", default=None, help="Also write the numbers here.")
    args = p.parse_args(argv)
    result = study(args.run_dir, [int(s) for s in args.steps.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
