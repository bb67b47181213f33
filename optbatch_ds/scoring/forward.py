"""Step 2 on a model: forwards over a rank's candidates (no autograd graph), then the maths of `features`.

    scorer = Scorer.build(engine.module, optbatch, pad_id=tokenizer.pad_token_id, micro_batch_size=8)
    losses, sketches, tokens = scorer.score(engine, items, inv_sqrt_v, timers)

`engine` is anything called like a Hugging Face causal LM that has `.module` and `.device`: a DeepSpeed
engine (under ZeRO-3 its forward gathers the shards) or a bare model wrapper.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import optbatch_ds.scoring.features as features
from optbatch_ds import batching


class LmHeadInput:
    """Captures the input of the output layer during a forward (the h_t of DESIGN §2)."""

    def __init__(self, model):
        self.value = None
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0]

    def remove(self):
        self.handle.remove()


def feature_size(module, feature: str) -> int:
    """Length of a sample's feature vector f_i: the vocab rows of lm_head, or the hidden size for "hidden"."""
    weight = module.get_output_embeddings().weight
    vocab = (getattr(weight, "ds_shape", None) or weight.shape)[0]  # ZeRO-3: weight.shape is (0,) when partitioned
    return module.config.hidden_size if feature == "hidden" else vocab


def sketch_projection(module, feature: str, sketch_dim: int, seed: int) -> features.SketchProjection | None:
    """R of DESIGN §2 for this model's feature size (vocab rows, or hidden size for the "hidden" ablation);
    None when sketch_dim does not reduce the features (0, or not smaller than their size)."""
    feat_in = feature_size(module, feature)
    return features.SketchProjection(feat_in, sketch_dim, seed=seed) if 0 < sketch_dim < feat_in else None


@dataclass
class Scorer:
    """What a scoring forward needs that does not change between steps (built once per run).

    with_features: whether the selection uses sketches (optbatch with farthest-point filling); without
    them only the losses are computed. batch_size: samples per scoring forward.
    """

    feature: str
    vocab_chunk: int
    with_features: bool
    projection: features.SketchProjection | None
    batch_size: int
    pad_id: int
    by_length: bool = False   # score in batches of similar length (less padding); results keep the given order
    sketch_size: int = 0      # columns of the sketches it returns (k, or the feature size without projection)

    @classmethod
    def build(cls, module, optbatch, pad_id: int, micro_batch_size: int) -> "Scorer":
        """From an `OptBatchConfig`: score_batch_size 0 means twice the micro batch (no activations kept)."""
        with_features = optbatch.needs_features
        projection = (sketch_projection(module, optbatch.feature, optbatch.sketch_dim, optbatch.seed)
                      if with_features else None)
        size = (projection.sketch_dim if projection is not None else feature_size(module, optbatch.feature)
                ) if with_features else 0
        return cls(optbatch.feature, optbatch.vocab_chunk, with_features, projection,
                   optbatch.score_batch_size or 2 * micro_batch_size, pad_id, sketch_size=size)

    @property
    def wants_curvature(self) -> bool:
        return self.with_features and self.feature == "grad_curvature"

    @torch.no_grad()
    def score(self, engine, items: list, inv_sqrt_v, timers: dict) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(losses (n,), sketches (n, k) or None, tokens in the forwards) for `items` (objects with input_ids and
        labels), in `batch_size` forwards; adds to timers["score_forward"] and timers["features"] (seconds)."""
        model = engine.module
        was_training = model.training
        model.eval()
        capture = LmHeadInput(model)
        losses, feats, tokens = [], [], 0
        order = (sorted(range(len(items)), key=lambda i: -len(items[i].input_ids)) if self.by_length
                 else list(range(len(items))))
        try:
            for s in range(0, len(items), self.batch_size):
                batch = batching.collate([items[i] for i in order[s:s + self.batch_size]], self.pad_id, engine.device)
                tokens += int(batch["attention_mask"].sum())
                t0 = time.perf_counter()
                out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                t1 = time.perf_counter()
                timers["score_forward"] += t1 - t0
                loss, feat = self.signals(capture.value, out.logits, batch["labels"], inv_sqrt_v)
                losses.append(loss.float().cpu())
                if feat is not None:
                    feats.append(feat.float().cpu())
                timers["features"] += time.perf_counter() - t1
        finally:
            capture.remove()
            if was_training:
                model.train()
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(order))  # results in the given order
        return torch.cat(losses)[back], (torch.cat(feats)[back] if feats else None), tokens

    def signals(self, hidden, logits, labels, inv_sqrt_v):
        """(losses (B,), features (B, k) or None) of one forward's lm_head input `hidden` and `logits`."""
        if not self.with_features or self.feature == "hidden":
            loss = features.per_sample_loss(logits, labels)
            feat = features.hidden_features(hidden, labels, projection=self.projection) if self.with_features else None
            return loss, feat
        rows = inv_sqrt_v if isinstance(inv_sqrt_v, features.RowCurvature) else None  # curvature "ema"
        full = inv_sqrt_v if self.feature == "grad_curvature" and rows is None else None
        return features.output_layer_features(hidden, logits, labels, inv_sqrt_v=full, projection=self.projection,
                                              vocab_chunk=self.vocab_chunk, row_curvature=rows)
