"""Step 2 of the OptBatch step (DESIGN §2): per-sample loss and curvature-normalised gradient sketches.

    features.py   the maths, pure: losses, output-layer gradient features in vocab chunks, sketches R f
    curvature.py  1 / sqrt(Adam v) of lm_head.weight, read through DeepSpeed's accessors (collective)
    forward.py    `Scorer`: forwards over a rank's candidates with the model being trained
    config.py     the scoring keys of the "optbatch" section
    policy.py     `CurvaturePolicy`: the "curvature" key (adam, ema, none, auto) resolved, ema's running statistic

    losses, feats = output_layer_features(hidden, logits, labels,
                                          inv_sqrt_v=curvature_inv_sqrt(engine, eps=1e-8),
                                          projection=SketchProjection(vocab_size, sketch_dim=512, seed=0))
"""
from .config import CURVATURES, FEATURES, ScoringConfig
from .curvature import curvature_inv_sqrt
from .features import (IGNORE_INDEX, FeatureShape, RowCurvature, SketchProjection, hidden_features,
                       output_layer_features, peak_feature_memory_bytes, per_sample_loss)
from .forward import LmHeadInput, Scorer, sketch_projection
from .policy import CurvaturePolicy, output_layer_trains, resolve_curvature

__all__ = ["CURVATURES", "FEATURES", "IGNORE_INDEX", "CurvaturePolicy", "FeatureShape", "LmHeadInput", "RowCurvature",
           "Scorer", "ScoringConfig", "SketchProjection", "curvature_inv_sqrt", "hidden_features",
           "output_layer_features", "output_layer_trains", "peak_feature_memory_bytes", "per_sample_loss",
           "resolve_curvature", "sketch_projection"]
