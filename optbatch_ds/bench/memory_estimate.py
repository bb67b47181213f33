"""GPU memory per rank of a run, estimated from the model's shape: full fine-tuning, LoRA and QLoRA, with and without
activation checkpointing, the OptBatch scoring pass included. Run as:

    python -m optbatch_ds.bench.memory_estimate                     # Llama-2-7B, 2048 tokens, micro batch 8
    python -m optbatch_ds.bench.memory_estimate --params 70e9 --layers 80 --hidden 8192 --ffn 28672 --gpus 8

An estimate, not a measurement (tests/gpu measures a 160M model); the terms, per rank, in bytes:
  model states   full: 16 P / G (bf16 weight + grad, fp32 master + Adam m, v; ZeRO-3 partitions all of it);
                 LoRA: 2 P / G frozen bf16 base + 16 A / G for the A adapter parameters;
                 QLoRA: 0.5625 (P - 2 V h) / G NF4 with double-quantized constants + 4 V h / G 16-bit embeddings
                 and lm_head (bitsandbytes leaves them unquantized) + 16 A / G
  activations    per sample and layer 34 s h in 16 bits without checkpointing (Korthikanti et al. 2022, no s^2 term:
                 sdpa / flash attention never hold the score matrix); with checkpointing every layer keeps its 2 s h
                 input and one layer at a time is recomputed: 2 s h L + 34 s h. LoRA is counted the same: its frozen
                 linears keep no input for the backward, but each adapter's dropout keeps a copy of it
  logits         12 s V per trained sample (bf16 logits, their fp32 copy in the loss, log-softmax and its gradient)
  scoring pass   2 x micro samples, no graph: bf16 logits 2 s V each + `scoring.peak_feature_memory_bytes`
                 (vocab_chunk 4096, sketch 512); it runs between training forwards, so the peak takes the larger
  curvature      adam: the V x h fp32 second moment of lm_head on every rank; ema: 8 V
  ZeRO-3         up to 2 GiB of gathered 16-bit parameters (stage3_max_live_parameters = 1e9)
"""
from __future__ import annotations

import argparse
import sys

GIB = 2**30


def lora_params(layers: int, hidden: int, ffn: int, kv_hidden: int, r: int) -> int:
    """Adapter parameters of LoRA rank r on every linear layer of a Llama block (q, k, v, o, gate, up, down)."""
    attention = r * (hidden + hidden) * 2 + r * (hidden + kv_hidden) * 2
    mlp = r * (hidden + ffn) * 3
    return layers * (attention + mlp)


def estimate(a, mode: str, checkpointing: bool) -> dict:
    """GiB per rank of each term for `mode` in full / lora / qlora."""
    from optbatch_ds.scoring import FeatureShape, peak_feature_memory_bytes

    P, L, h, V, s, G = a.params, a.layers, a.hidden, a.vocab, a.seq, a.gpus
    A = lora_params(L, h, a.ffn, a.kv_hidden or h, a.lora_r)
    states = {"full": 16 * P, "lora": 2 * P + 16 * A, "qlora": 0.5625 * (P - 2 * V * h) + 4 * V * h + 16 * A}[mode] / G
    act = (2 * s * h * L + 34 * s * h) if checkpointing else 34 * s * h * L
    train = a.micro * (act + 12 * s * V)
    score = 2 * a.micro * 2 * s * V + peak_feature_memory_bytes(FeatureShape(2 * a.micro, s, h, V), 4096, 512)
    curvature = 4 * V * h if mode == "full" else 8 * V
    zero3 = 2 * GIB if G > 1 else 0
    total = states + max(train, score) + curvature + zero3
    return {k: v / GIB for k, v in dict(states=states, train=train, score=score, curvature=curvature, zero3=zero3,
                                        total=total).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m optbatch_ds.bench.memory_estimate", description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, default=6.74e9)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--kv-hidden", type=int, default=0, help="k/v projection width (GQA); default = hidden")
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro", type=int, default=8, help="train_micro_batch_size_per_gpu (8 in ds_configs/zero3.json)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 2, 1])
    p.add_argument("--lora-r", type=int, default=16)
    args = p.parse_args(argv)
    print("| run | GPUs | checkpointing | model states | training forward+backward | scoring pass | curvature | "
          "ZeRO-3 buffers | total GiB per GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("full", "lora", "qlora"):
        for gpus in args.gpus:
            for ckpt in (False, True):
                row = estimate(argparse.Namespace(**{**vars(args), "gpus": gpus}), mode, ckpt)
                print(f"| {mode} | {gpus} | {'on' if ckpt else 'off'} | {row['states']:.1f} | {row['train']:.1f} | "
                      f"{row['score']:.1f} | {row['curvature']:.2f} | {row['zero3']:.0f} | **{row['total']:.1f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
