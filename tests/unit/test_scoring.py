"""Step 2 signals against a float64 reference built from autograd per-sample gradients.

    python -m pytest tests/unit/test_scoring.py -q
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optbatch_ds.scoring import features as scoring  # the maths module: the patch target of the cache size
from optbatch_ds.scoring import (
    FeatureShape,
    SketchProjection,
    hidden_features,
    output_layer_features,
    peak_feature_memory_bytes,
    per_sample_loss,
)

pytestmark = pytest.mark.unit

EPS = 1e-8
BETA2 = 0.95


def _multi_turn_labels(gen, batch, tokens, vocab, empty_rows=()):
    """Right-padded samples whose supervised tokens come in several separate spans (assistant turns)."""
    labels = torch.full((batch, tokens), -100, dtype=torch.int64)
    for i in range(batch):
        length = int(torch.randint(tokens // 2, tokens + 1, (1,), generator=gen))  # right padding after it
        pos, supervised = 0, False
        while pos < length:
            span = int(torch.randint(1, 5, (1,), generator=gen))
            if supervised and i not in empty_rows:
                end = min(pos + span, length)
                labels[i, pos:end] = torch.randint(0, vocab, (end - pos,), generator=gen)
            pos, supervised = pos + span, not supervised
        if i not in empty_rows and (labels[i, 1:] == -100).all():
            labels[i, length - 1] = int(torch.randint(0, vocab, (1,), generator=gen))
    return labels


def _case(seed, batch=5, tokens=16, width=8, vocab=53, empty_rows=()):
    """A float64 lm_head trained a few Adam steps, inputs, and the autograd per-sample reference."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, vocab, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen, dtype=torch.float64) * 1.5 / math.sqrt(width))
    # Real Adam state: a few steps on an unrelated loss, then bias-correct exp_avg_sq by hand.
    adam = torch.optim.Adam(head.parameters(), lr=1e-2, betas=(0.9, BETA2), eps=EPS)
    for _ in range(3):
        x = torch.randn(32, width, generator=gen, dtype=torch.float64)
        y = torch.randint(0, vocab, (32,), generator=gen)
        adam.zero_grad()
        F.cross_entropy(head(x), y).backward()
        adam.step()
    state = adam.state[head.weight]
    v_hat = state["exp_avg_sq"] / (1 - BETA2 ** int(state["step"]))
    inv_sqrt_v = (v_hat + EPS).rsqrt()

    hidden = torch.randn(batch, tokens, width, generator=gen, dtype=torch.float64)
    labels = _multi_turn_labels(gen, batch, tokens, vocab, empty_rows)
    logits = head(hidden)
    losses, grads = [], []
    for i in range(batch):
        mask = labels[i, 1:] != -100
        if not mask.any():
            losses.append(torch.tensor(float("nan"), dtype=torch.float64))
            grads.append(torch.full((vocab, width), float("nan"), dtype=torch.float64))
            continue
        loss = F.cross_entropy(logits[i, :-1][mask], labels[i, 1:][mask])  # mean over supervised tokens
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, head.weight, retain_graph=True)[0])
    return dict(hidden=hidden, logits=logits.detach(), labels=labels, inv_sqrt_v=inv_sqrt_v,
                loss=torch.stack(losses), grad=torch.stack(grads), vocab=vocab)


def _rel(a, b):
    """Largest per-sample normwise relative error."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


CHUNKS = [1, 7, 16, 53, 4096]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("curvature", [False, True])
def test_features_match_autograd_reference(seed, dtype, tol, curvature):
    c = _case(seed)
    inv = c["inv_sqrt_v"] if curvature else None
    feat_ref = (c["grad"] * (inv if curvature else 1.0)).norm(dim=-1)  # f_i[u] = ||G_i[u, :] * inv[u, :]||
    proj = SketchProjection(c["vocab"], sketch_dim=12, seed=seed, block=5)
    sketch_ref = feat_ref @ proj.block_matrix(0, c["vocab"]).double().t()
    h, z = c["hidden"].to(dtype), c["logits"].to(dtype)
    inv_in = None if inv is None else inv.to(dtype)
    for chunk in CHUNKS:
        loss, feat = output_layer_features(h, z, c["labels"], inv_sqrt_v=inv_in, vocab_chunk=chunk)
        assert loss.dtype == dtype and feat.dtype == dtype and feat.shape == (5, c["vocab"])
        assert _rel(loss[:, None], c["loss"][:, None]) < tol
        assert _rel(feat, feat_ref) < tol, chunk
        loss_s, sketch = output_layer_features(h, z, c["labels"], inv_sqrt_v=inv_in, projection=proj, vocab_chunk=chunk)
        assert sketch.shape == (5, 12)
        assert _rel(sketch, sketch_ref) < tol, chunk
        assert torch.equal(loss_s, loss)
    assert _rel(per_sample_loss(z, c["labels"])[:, None], c["loss"][:, None]) < tol


def test_raw_gradient_is_exact_output_layer_gradient():
    """With no normaliser and no projection, sum_u f_i[u]^2 is ||d l_i / d W||_F^2."""
    c = _case(3)
    _, feat = output_layer_features(c["hidden"], c["logits"], c["labels"])
    torch.testing.assert_close(feat.square().sum(1), c["grad"].square().sum((1, 2)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("vocab,chunks", [(53, [1, 5, 7, 16, 52, 53, 100]), (64, [1, 8, 16, 32, 64, 4096])])
def test_chunk_size_does_not_change_results(vocab, chunks):
    c = _case(4, vocab=vocab)
    proj = SketchProjection(vocab, sketch_dim=9, seed=1, block=16)
    results = [output_layer_features(c["hidden"], c["logits"], c["labels"], c["inv_sqrt_v"], proj, vocab_chunk=k)
               for k in chunks]
    raw = [output_layer_features(c["hidden"], c["logits"], c["labels"], c["inv_sqrt_v"], None, vocab_chunk=k)
           for k in chunks]
    for (loss, sketch), (loss_raw, feat) in zip(results[1:], raw[1:]):
        # Identical up to the order of float sums (logsumexp across chunks, the sketch's accumulation).
        torch.testing.assert_close(loss, results[0][0], rtol=1e-14, atol=0)
        torch.testing.assert_close(loss_raw, loss, rtol=0, atol=0)
        torch.testing.assert_close(feat, raw[0][1], rtol=1e-13, atol=0)
        torch.testing.assert_close(sketch, results[0][1], rtol=1e-13, atol=1e-15)


def test_bf16_logits_are_computed_in_float32():
    c = _case(5)
    h, z = c["hidden"].float(), c["logits"].bfloat16()
    loss, feat = output_layer_features(h, z, c["labels"], c["inv_sqrt_v"].float(), vocab_chunk=7)
    assert loss.dtype == torch.float32 and feat.dtype == torch.float32
    # Same as float32 arithmetic on the bf16-rounded logits, not bf16 arithmetic.
    loss32, feat32 = output_layer_features(h, z.float(), c["labels"], c["inv_sqrt_v"].float(), vocab_chunk=7)
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=0)
    torch.testing.assert_close(feat, feat32, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sample_without_supervised_tokens_gives_nan_not_a_crash(dtype):
    c = _case(6, empty_rows=(2,))
    proj = SketchProjection(c["vocab"], 7, seed=0)
    loss, feat = output_layer_features(c["hidden"].to(dtype), c["logits"].to(dtype), c["labels"],
                                       c["inv_sqrt_v"].to(dtype), vocab_chunk=16)
    _, sketch = output_layer_features(c["hidden"].to(dtype), c["logits"].to(dtype), c["labels"],
                                      c["inv_sqrt_v"].to(dtype), proj, vocab_chunk=16)
    assert torch.isnan(loss[2]) and not torch.isfinite(feat[2]).any() and not torch.isfinite(sketch[2]).any()
    assert torch.isnan(per_sample_loss(c["logits"].to(dtype), c["labels"])[2])
    keep = [0, 1, 3, 4]  # the others are untouched by the empty one
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert _rel(loss[keep][:, None], c["loss"][keep][:, None]) < tol
    assert _rel(feat[keep], (c["grad"][keep] * c["inv_sqrt_v"]).norm(dim=-1)) < tol
    assert torch.isfinite(sketch[keep]).all()
    nothing = torch.full_like(c["labels"], -100)  # no sample supervised at all
    loss, feat = output_layer_features(c["hidden"].to(dtype), c["logits"].to(dtype), nothing, vocab_chunk=16)
    assert torch.isnan(loss).all() and torch.isnan(feat).all() and feat.shape == (5, c["vocab"])
    assert torch.isnan(per_sample_loss(c["logits"].to(dtype), nothing)).all()


def test_hidden_features_is_masked_mean():
    c = _case(7)
    h, labels = c["hidden"], c["labels"]
    expected = torch.stack([h[i, :-1][labels[i, 1:] != -100].mean(0) for i in range(h.shape[0])])
    torch.testing.assert_close(hidden_features(h, labels), expected, rtol=1e-12, atol=1e-14)
    proj = SketchProjection(h.shape[-1], 4, seed=3)
    r = proj.block_matrix(0, h.shape[-1]).double()
    torch.testing.assert_close(hidden_features(h, labels, proj), expected @ r.t())
    assert hidden_features(h.float(), labels).dtype == torch.float32


def test_bad_inputs_get_a_message():
    c = _case(8)
    with pytest.raises(ValueError, match="labels must be"):
        output_layer_features(c["hidden"], c["logits"], c["labels"][:, :-1])
    with pytest.raises(ValueError, match="inv_sqrt_v must be"):
        output_layer_features(c["hidden"], c["logits"], c["labels"], inv_sqrt_v=c["inv_sqrt_v"].t())
    with pytest.raises(ValueError, match="projection maps"):
        output_layer_features(c["hidden"], c["logits"], c["labels"], projection=SketchProjection(10, 4, 0))
    bad = c["labels"].clone()
    bad[0, -1] = c["vocab"]
    with pytest.raises(ValueError, match="token id in"):
        per_sample_loss(c["logits"], bad)


# ---------------------------------------------------------------------------- SketchProjection

def test_projection_is_the_same_whatever_the_chunking_and_instance():
    a = SketchProjection(1000, 16, seed=42, block=128)
    b = SketchProjection(1000, 16, seed=42, block=128)
    full = a.block_matrix(0, 1000)
    assert full.shape == (16, 1000)
    for cuts in ([0, 1000], [0, 1, 127, 128, 129, 500, 999, 1000], [0, 300, 301, 700, 1000]):
        pieces = torch.cat([b.block_matrix(u0, u1) for u0, u1 in zip(cuts[:-1], cuts[1:])], dim=1)
        assert torch.equal(pieces, full)
    x = torch.randn(3, 1000, dtype=torch.float64)
    torch.testing.assert_close(a(x), x @ full.double().t(), rtol=1e-12, atol=1e-12)
    uncached = SketchProjection(1000, 16, seed=42, block=128, cache_bytes=0)
    assert torch.equal(uncached.block_matrix(0, 1000), full)
    assert not torch.equal(SketchProjection(1000, 16, seed=43, block=128).block_matrix(0, 1000), full)
    assert SketchProjection(1000, 0, seed=42)(x) is x  # sketch_dim 0: identity


def test_projection_is_scaled_to_preserve_norms_on_average():
    proj = SketchProjection(4096, 256, seed=0)
    r = proj.block_matrix(0, 4096).double()
    # E ||R x||^2 = ||x||^2  <=>  E[R^T R] = I: each column has E||r_u||^2 = 1 (k entries of variance 1/k).
    col = r.square().sum(0)
    assert abs(float(col.mean()) - 1.0) < 0.01 and abs(float(r.mean())) < 1e-3


def _jl_eps(k: int, n: int, beta: float = 1.0) -> float:
    """Smallest eps with k >= (4 + 2 beta) ln n / (eps^2/2 - eps^3/3) (Achlioptas 2003; beta = 0 is
    Dasgupta-Gupta): a Gaussian projection to k dims then keeps all n(n-1)/2 squared distances within
    (1 +- eps) with probability >= 1 - n^-beta."""
    need = (4 + 2 * beta) * math.log(n) / k
    lo, hi = 1e-6, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid * mid / 2 - mid ** 3 / 3 < need else (lo, mid)
    return hi


# The sketch_dim this test supports as the default. Observed (n = 200, V = 8192, seed 0), max / median
# |ratio - 1| of the 19900 squared distances: k=256 0.369 / 0.051, k=512 0.239 / 0.041, k=1024
# 0.169 / 0.031. k = 512 keeps every distance within ~12% (sqrt of 1 +- 0.24) at negligible cost.
RECOMMENDED_SKETCH_DIM = 512


@pytest.mark.parametrize("k", [256, 512, 1024])  # k = 128 < 6 ln(200) / (1/6): no bound below eps = 1
def test_johnson_lindenstrauss_pairwise_distances(k):
    n, dim = 200, 8192
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(n // 2, dim, generator=gen, dtype=torch.float64)
    # Feature-like points too: non-negative, heavy-tailed, mostly near zero (softmax-gradient row norms).
    sparse = torch.randn(n // 2, dim, generator=gen, dtype=torch.float64).exp() ** 3
    sparse *= torch.rand(n // 2, dim, generator=gen, dtype=torch.float64) < 0.05
    points = torch.cat([dense, sparse])
    proj = SketchProjection(dim, k, seed=0)
    sketched = proj(points)
    iu = torch.triu_indices(n, n, offset=1)
    ratio = torch.cdist(sketched, sketched).square()[iu[0], iu[1]] / torch.cdist(points, points).square()[iu[0], iu[1]]
    distortion = float((ratio - 1).abs().max())
    bound = _jl_eps(k, n)
    print(f"k={k}: max |ratio - 1| = {distortion:.3f} over {ratio.numel()} pairs, "
          f"median {float((ratio - 1).abs().median()):.3f}, JL bound (1 - 1/n) {bound:.3f}")
    assert distortion <= bound
    if k == RECOMMENDED_SKETCH_DIM:
        assert distortion < 0.3  # all pairwise distances within ~15%: what farthest-point selection sees


# ---------------------------------------------------------------------------- memory

def _profiled_peak_bytes(fn) -> tuple[int, int]:
    """(peak live bytes, largest single allocation) that `fn` allocates on the CPU, from the profiler's
    allocation trace (tracemalloc cannot see torch's allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        pytest.skip("this torch profiler does not expose its allocation events")
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = largest = 0
    for _, nbytes in events:
        live += nbytes
        peak, largest = max(peak, live), max(largest, nbytes)
    return peak, largest


@pytest.mark.parametrize("B,T,d,V,chunk,k,block,dtype,cached", [
    (4, 64, 32, 3000, 512, 0, 4096, torch.float32, True),
    (4, 64, 32, 3000, 700, 64, 512, torch.float32, True),
    (2, 128, 64, 5000, 1000, 256, 512, torch.float32, True),
    (4, 64, 32, 3000, 700, 64, 512, torch.bfloat16, True),
    (4, 64, 32, 3000, 700, 64, 512, torch.float64, True),
    (4, 64, 4, 3000, 700, 256, 4096, torch.float32, False),  # R too big to cache: a block is drawn per use
    (16, 200, 16, 2000, 500, 32, 512, torch.bfloat16, True),  # > 1024 packed rows: bf16 converted in blocks
])
def test_peak_memory_formula_matches_a_real_run(monkeypatch, B, T, d, V, chunk, k, block, dtype, cached):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    logits = torch.randn(B, T, V, generator=gen).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    for i in range(B):  # prompts of different lengths: only supervised rows are packed
        labels[i, : T // 4 + 3 * i] = -100
    supervised = int((labels[:, 1:] != -100).sum(1).max())
    inv = torch.rand(V, d, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    proj = None
    if k:
        proj = SketchProjection(V, k, seed=0, block=block, cache_bytes=scoring._SKETCH_CACHE_BYTES if cached else 0)
        proj.block_matrix(0, V)  # warm the cache: cached blocks belong to the projection, not the call
    if not cached:
        monkeypatch.setattr(scoring, "_SKETCH_CACHE_BYTES", 0)
    peak, largest = _profiled_peak_bytes(
        lambda: output_layer_features(hidden, logits, labels, inv_sqrt_v=inv, projection=proj, vocab_chunk=chunk))
    s = 8 if dtype == torch.float64 else 4
    bound = peak_feature_memory_bytes(FeatureShape(B, T, d, V, supervised=supervised), chunk, k, dtype_bytes=s,
                                      sketch_block=block, logits_bytes=logits.element_size())
    print(f"measured peak {peak} B, formula {bound} B ({peak / bound:.3f}); largest allocation {largest} B")
    assert peak <= bound <= 1.05 * peak  # an upper bound, and a tight one
    c, rows = min(chunk, V), B * supervised
    uncached_block = 0 if cached or not k else k * min(block, V) * 4
    assert largest == max(s * rows * c, s * B * c * d, s * B * (k or V), uncached_block)
    # The default (no `supervised`) bounds every batch of that shape.
    assert peak_feature_memory_bytes(FeatureShape(B, T, d, V), chunk, k, dtype_bytes=s, sketch_block=block,
                                     logits_bytes=logits.element_size()) >= bound
