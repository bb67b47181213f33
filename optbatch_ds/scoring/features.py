"""The maths of step 2 (DESIGN.md §2): per-sample signals from one forward pass, no autograd graph.

    losses, feats = output_layer_features(hidden, logits, labels,
                                          inv_sqrt_v=curvature_inv_sqrt(engine, eps=1e-8),
                                          projection=SketchProjection(vocab_size, sketch_dim=512, seed=0))

`hidden` (B, T, d) is the input of the output layer (`model.get_output_embeddings()`) at every position,
`logits` (B, T, V) its output, `labels` (B, T) in the Hugging Face convention (aligned with input_ids,
-100 = not supervised; position t's logits predict labels[t + 1], the shift happens here). For sample i
the supervised positions t are those with labels[t + 1] != -100, n_i of them, and

    l_i      = (1 / n_i) sum_t NLL_t                                 the per-sample loss
    delta_t  = softmax(z_t) - onehot(y_{t+1})
    G_i      = (1 / n_i) sum_t delta_t h_t^T   (V x d)               exactly d l_i / d lm_head.weight
    f_i[u]   = || G_i[u, :] * inv_sqrt_v[u, :] ||_2                  inv_sqrt_v = 1 / sqrt(v_hat + eps)
    s_i      = R f_i,  R (k x V) Gaussian / sqrt(k)                  k = 0 (projection None): s_i = f_i

The gradient has a closed form, so no backward pass is needed, and it is computed in vocab chunks so no
per-sample V x d tensor (nor, when projecting, the (B, V) feature matrix) is ever held. Arithmetic is in
float32 (float64 when an input is float64) whatever the dtype of the logits.

Only supervised positions are computed: they are packed per sample (n = the largest supervised count
in the batch, N = B n rows), so prompt tokens and padding cost neither time nor memory.

Peak extra memory of `output_layer_features` (s = 4 bytes float32 / 8 float64, c = min(vocab_chunk, V),
k = sketch_dim, K = k if projecting else V; exact statement in `peak_feature_memory_bytes`, checked
against the profiler's allocation trace in tests/unit/test_scoring.py):

    s * (N d + B K)                    packed weighted hidden + the result, held throughout
  + s * max(N c + B c d, ...)          one softmax/delta chunk + one gradient chunk G_i[u0:u1]
  + O(N) + R's block when R is too big to cache

Nothing grows with B V d or (when projecting) B V; vocab_chunk trades the chunk terms against the
number of loop iterations.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100

# SketchProjection keeps its generated blocks (on the device that uses them) while all of R fits in
# this many bytes: 256 MiB holds k = 512 for a 128k vocab; beyond it blocks are redrawn on each use.
_SKETCH_CACHE_BYTES = 256 * 2**20


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, tokens, vocab), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be (batch, tokens) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer token ids (-100 = not supervised), got dtype {labels.dtype}")
    if hidden is not None and (hidden.dim() != 3 or hidden.shape[:2] != logits.shape[:2]):
        raise ValueError(f"hidden must be (batch, tokens, d) with (batch, tokens) = {tuple(logits.shape[:2])}, "
                         f"got {tuple(hidden.shape)}")
    targets = labels[:, 1:]
    supervised = targets[targets != IGNORE_INDEX]
    if supervised.numel() and (int(supervised.min()) < 0 or int(supervised.max()) >= logits.shape[-1]):
        raise ValueError(f"labels must be -100 or a token id in [0, {logits.shape[-1]}), "
                         f"got values in [{int(supervised.min())}, {int(supervised.max())}]")


# Rows converted at a time when the logits' dtype differs from the compute dtype (bf16 -> float32), so
# the conversion never holds a second full chunk in the input dtype.
_CONVERT_ROWS = 1024


class _Supervised:
    """The supervised positions of a batch, packed: sample b's positions first, padded to n_max.

    Only these rows of the logits and hidden states enter any computation, so prompt tokens and padding
    cost nothing. Row r = (b, j) is position t_idx[r] of sample b = b_idx[r], predicting target[r];
    valid[r] is False on padding rows (samples with fewer than n_max supervised tokens).
    """

    def __init__(self, labels: torch.Tensor):
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX  # position t predicts labels[t + 1]
        self.batch = labels.shape[0]
        self.count = supervised.sum(dim=1)
        self.n_max = int(self.count.max()) if self.batch else 0
        # A stable sort brings each sample's supervised positions to the front, in order.
        order = torch.argsort((~supervised).to(torch.uint8), dim=1, stable=True)[:, :self.n_max]
        valid = torch.arange(self.n_max, device=labels.device) < self.count.unsqueeze(1)
        self.b_idx = torch.arange(self.batch, device=labels.device).repeat_interleave(self.n_max)
        self.t_idx = order.reshape(-1).clone()  # clone: drop the (B, T') argsort result
        self.target = targets.gather(1, order).masked_fill_(~valid, 0).reshape(-1)
        self.valid = valid.reshape(-1)

    def gather(self, x: torch.Tensor, dtype: torch.dtype, u0: int | None = None, u1: int | None = None):
        """x[b, t, u0:u1] for every row, as a new contiguous (rows, u1 - u0) tensor in `dtype`."""
        src = x if u0 is None else x[..., u0:u1]
        if x.dtype == dtype:
            return src[self.b_idx, self.t_idx]  # advanced indexing: one allocation, no full-size copy
        out = torch.empty(self.b_idx.numel(), src.shape[-1], dtype=dtype, device=x.device)
        for r0 in range(0, out.shape[0], _CONVERT_ROWS):
            r1 = r0 + _CONVERT_ROWS
            out[r0:r1] = src[self.b_idx[r0:r1], self.t_idx[r0:r1]]
        return out


def _logsumexp(logits: torch.Tensor, rows: _Supervised, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """logsumexp over the vocab at every packed row, one pass over (rows, chunk) blocks (online max)."""
    vocab = logits.shape[-1]
    top = torch.full((rows.valid.numel(),), -math.inf, dtype=dtype, device=logits.device)
    total = torch.zeros_like(top)
    for u0 in range(0, vocab, chunk):
        block = rows.gather(logits, dtype, u0, min(u0 + chunk, vocab))
        new_top = torch.maximum(top, block.amax(dim=-1))
        new_top = torch.where(torch.isfinite(new_top), new_top, torch.zeros_like(new_top))  # all -inf so far
        total.mul_((top - new_top).exp_()).add_(block.sub_(new_top.unsqueeze(-1)).exp_().sum(dim=-1))
        top = new_top
        del block  # free before the next block is gathered
    return top + total.log()


def _losses(logits: torch.Tensor, rows: _Supervised, lse: torch.Tensor, dtype: torch.dtype):
    target_logit = logits[rows.b_idx, rows.t_idx, rows.target].to(dtype)
    nll = (lse - target_logit).masked_fill_(~rows.valid, 0.0).view(rows.batch, rows.n_max)
    count = rows.count.to(dtype)
    return nll.sum(dim=1) / count, count  # 0 / 0 = NaN for a sample with nothing supervised


@torch.no_grad()
def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_chunk: int = 4096) -> torch.Tensor:
    """Mean token NLL of each sample over its supervised positions: (B,), float32 (float64 for float64 logits).

    NaN for a sample with no supervised token (n_i = 0), so the caller sees it instead of a silent 0.
    Only supervised positions are computed, vocab_chunk columns at a time.
    """
    _check_inputs(logits, labels)
    dtype = _compute_dtype(logits)
    rows = _Supervised(labels.to(logits.device))
    lse = _logsumexp(logits, rows, dtype, max(1, int(vocab_chunk)))
    return _losses(logits, rows, lse, dtype)[0]


class RowCurvature:
    """The per-row curvature of the `ema` policy (scoring.policy) for one scoring pass.

    scale: (V,) 1 / sqrt(m_u + eps), each vocab row's normaliser (None: the identity, before any statistic);
    `output_layer_features` divides row u of every G_i by it, i.e. v[u, :] = m_u for the whole row. While it
    computes the features it also accumulates, over the samples with a finite loss,
        sum_sq[u] = sum_i ||G_i[u, :]||^2 / d        (float64, on the features' device)   and   count = #samples,
    so sum_sq / count is the pass's mean per-sample second moment of the output-layer gradient, row by row: the
    statistic the EMA folds in. Nothing extra is computed: ||G_i[u, :]||^2 is the square the row norm takes anyway.
    """

    def __init__(self, scale: torch.Tensor | None = None):
        self.scale = scale
        self.sum_sq: torch.Tensor | None = None
        self.count = 0

    def _add(self, squares: torch.Tensor, use: torch.Tensor, u0: int, vocab: int, width: int) -> None:
        if self.sum_sq is None:
            self.sum_sq = torch.zeros(vocab, dtype=torch.float64, device=squares.device)
        self.sum_sq[u0:u0 + squares.shape[1]] += (squares[use].sum(dim=0) / width).to(torch.float64)


def _check_feature_args(logits, labels, hidden, inv_sqrt_v, projection, row_curvature):
    _check_inputs(logits, labels, hidden)
    vocab, width = logits.shape[-1], hidden.shape[-1]
    if inv_sqrt_v is not None and tuple(inv_sqrt_v.shape) != (vocab, width):
        raise ValueError(f"inv_sqrt_v must be (vocab, hidden) = ({vocab}, {width}) like lm_head.weight, "
                         f"got {tuple(inv_sqrt_v.shape)}")
    if projection is not None and projection.sketch_dim == 0:
        projection = None
    if projection is not None and projection.in_dim != vocab:
        raise ValueError(f"projection maps {projection.in_dim} inputs but the vocab has {vocab} entries")
    scale = row_curvature.scale if row_curvature is not None else None
    if scale is not None and tuple(scale.shape) != (vocab,):
        raise ValueError(f"row_curvature.scale must be (vocab,) = ({vocab},), got {tuple(scale.shape)}")
    if scale is not None and inv_sqrt_v is not None:
        raise ValueError("give inv_sqrt_v (Adam, per element) or row_curvature.scale (per row), not both")
    return projection


class _GradientChunks:
    """G_i[u0:u1] for every sample, one vocab chunk at a time, from the packed supervised rows."""

    def __init__(self, hidden, logits, rows: _Supervised, lse, count, dtype):
        batch, width = rows.batch, hidden.shape[-1]
        self.logits, self.rows, self.lse, self.dtype = logits, rows, lse, dtype
        # h_t / n_i on supervised rows, 0 on padding rows: the G_i chunk is delta_chunk^T @ this.
        self.weighted = rows.gather(hidden, dtype).view(batch, rows.n_max, width)
        self.weighted.mul_((rows.valid.view(batch, rows.n_max).to(dtype) / count.unsqueeze(1)).unsqueeze(-1))
        self.every_row = torch.arange(rows.valid.numel(), device=logits.device)
        self.padding = ~rows.valid.unsqueeze(-1)

    def row_squares(self, u0: int, u1: int, inv_sqrt_v: torch.Tensor | None) -> torch.Tensor:
        """(B, u1 - u0): sum_j (G_i[u, j] inv_sqrt_v[u, j])^2 (inv_sqrt_v None: 1), the squared row norms."""
        rows, dtype = self.rows, self.dtype
        delta = rows.gather(self.logits, dtype, u0, u1).sub_(self.lse.unsqueeze(-1)).exp_()  # softmax chunk (rows, c)
        # Subtract the one-hot: -1 where the target falls in this chunk, +0 (exact) elsewhere, so no
        # data-dependent indexing (no device sync per chunk) and the sum order cannot matter.
        hit = (rows.target >= u0) & (rows.target < u1)
        delta.index_put_((self.every_row, (rows.target - u0).clamp_(0, u1 - u0 - 1)), hit.to(dtype).neg_(),
                         accumulate=True)
        delta.masked_fill_(self.padding, 0.0)  # also keeps inf/NaN logits of padding rows out of the sums
        grad = torch.bmm(delta.view(rows.batch, rows.n_max, u1 - u0).transpose(1, 2), self.weighted)  # (B, c, d)
        del delta, hit
        if inv_sqrt_v is not None:
            grad.mul_(inv_sqrt_v[u0:u1].to(device=self.logits.device, dtype=dtype))
        return grad.square_().sum(dim=-1)


@torch.no_grad()
def output_layer_features(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_sqrt_v: torch.Tensor | None = None,
    projection: "SketchProjection | None" = None,
    vocab_chunk: int = 4096,
    row_curvature: RowCurvature | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and curvature-normalised output-layer gradient features, in vocab chunks.

    Returns (losses (B,), feats (B, k)) when `projection` has sketch_dim k > 0, else (losses, feats (B, V))
    with feats[i, u] = f_i[u]. `inv_sqrt_v` (V, d) is `curvature_inv_sqrt(engine, eps)`; None means the
    identity (raw gradient row norms). `row_curvature` (the ema policy) instead divides each row by its (V,)
    scale and accumulates the rows' squared gradient norms (see `RowCurvature`); without it the results are
    exactly those of the per-element path. A sample with no supervised token gets a NaN loss and NaN features.
    Only supervised positions are computed (prompt tokens and padding are skipped).
    Peak extra memory: see the module docstring and `peak_feature_memory_bytes` (+ 8 V bytes with row_curvature).
    """
    projection = _check_feature_args(logits, labels, hidden, inv_sqrt_v, projection, row_curvature)
    batch, _, vocab = logits.shape
    width = hidden.shape[-1]
    dtype = _compute_dtype(hidden, logits, inv_sqrt_v)
    chunk = max(1, int(vocab_chunk))
    device = logits.device

    rows = _Supervised(labels.to(device))
    lse = _logsumexp(logits, rows, dtype, chunk)
    losses, count = _losses(logits, rows, lse, dtype)
    out_dim = projection.sketch_dim if projection is not None else vocab
    feats = torch.zeros(batch, out_dim, dtype=dtype, device=device)
    if rows.n_max == 0:  # nothing supervised anywhere
        return losses, feats.fill_(math.nan)
    if row_curvature is not None:
        use = torch.isfinite(losses)  # samples with a supervised token and finite logits
        row_curvature.count += int(use.sum())

    grads = _GradientChunks(hidden, logits, rows, lse, count, dtype)
    for u0 in range(0, vocab, chunk):
        u1 = min(u0 + chunk, vocab)
        squares = grads.row_squares(u0, u1, inv_sqrt_v)  # ||G_i[u, :] * inv_sqrt_v[u, :]||^2, (B, c)
        if row_curvature is not None:
            row_curvature._add(squares, use, u0, vocab, width)
            if row_curvature.scale is not None:
                squares.mul_(row_curvature.scale[u0:u1].to(device=device, dtype=dtype).square())
        rownorm = squares.sqrt_()  # f_i[u0:u1], (B, c)
        if projection is None:
            feats[:, u0:u1] = rownorm
        else:
            projection.accumulate(feats, rownorm, u0)
        del rownorm, squares  # free before the next chunk's buffers are allocated
    return losses, feats


@torch.no_grad()
def hidden_features(hidden: torch.Tensor, labels: torch.Tensor,
                    projection: "SketchProjection | None" = None) -> torch.Tensor:
    """Ablation "hidden-state embedding": mean of h_t over supervised positions (labels[t + 1] != -100).

    (B, d) float32 (float64 for float64 hidden), or (B, k) through `projection`; NaN rows for n_i = 0.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (batch, tokens, d) and labels (batch, tokens), "
                         f"got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    dtype = _compute_dtype(hidden)
    supervised = (labels[:, 1:].to(hidden.device) != IGNORE_INDEX).to(dtype)
    weights = supervised / supervised.sum(dim=1, keepdim=True)
    mean = torch.bmm(weights.unsqueeze(1), hidden[:, :-1].to(dtype)).squeeze(1)
    if projection is None or projection.sketch_dim == 0:
        return mean
    return projection(mean)


class SketchProjection:
    """R (sketch_dim x in_dim), i.i.d. N(0, 1/k) entries, so E ||R x||^2 = ||x||^2.

    Every rank builds the same R from `seed` with no communication: column block j (columns
    [j*block, (j+1)*block)) is drawn from a CPU generator seeded by (seed, j), so R[:, u0:u1] does not
    depend on how the caller chunks the columns, on the device, or on the process. Blocks are kept
    (per device) while all of R fits in `cache_bytes` (default 256 MiB), else redrawn on each use.
    sketch_dim 0 means no projection (`__call__` is the identity).
    """

    def __init__(self, in_dim: int, sketch_dim: int, seed: int, block: int = 4096, dtype=torch.float32,
                 cache_bytes: int = _SKETCH_CACHE_BYTES):
        if in_dim < 1 or sketch_dim < 0 or block < 1:
            raise ValueError(f"SketchProjection needs in_dim >= 1, sketch_dim >= 0, block >= 1; "
                             f"got in_dim={in_dim}, sketch_dim={sketch_dim}, block={block}")
        self.in_dim, self.sketch_dim, self.seed, self.block = int(in_dim), int(sketch_dim), int(seed), int(block)
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self._cache_blocks = self.sketch_dim * self.in_dim * itemsize <= cache_bytes
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    def _block(self, j: int, device) -> torch.Tensor:
        key = (j, str(device))
        if key in self._cache:
            return self._cache[key]
        # SeedSequence mixes (seed, j) so distinct pairs give unrelated streams (no seed*N + j collisions).
        state = np.random.SeedSequence([self.seed, j]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))
        width = min(self.block, self.in_dim - j * self.block)
        r = torch.randn(self.sketch_dim, width, generator=gen, dtype=self.dtype)
        r = r.mul_(1.0 / math.sqrt(self.sketch_dim)).to(device)
        if self._cache_blocks:
            self._cache[key] = r
        return r

    def _spans(self, u0: int, u1: int):
        """(block id, first column in the block, last + 1) for every block that meets [u0, u1)."""
        if not 0 <= u0 <= u1 <= self.in_dim:
            raise ValueError(f"column range [{u0}, {u1}) outside [0, {self.in_dim})")
        for j in range(u0 // self.block, -(-u1 // self.block)):
            b0 = j * self.block
            yield j, max(u0, b0) - b0, min(u1, b0 + self.block) - b0

    def block_matrix(self, u0: int, u1: int, device=None) -> torch.Tensor:
        """R[:, u0:u1] (sketch_dim x (u1 - u0)), identical whatever chunking the caller uses."""
        device = torch.device("cpu") if device is None else torch.device(device)
        parts = [self._block(j, device)[:, a:b] for j, a, b in self._spans(u0, u1)]
        if not parts:
            return torch.zeros(self.sketch_dim, 0, dtype=self.dtype, device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def accumulate(self, out: torch.Tensor, x: torch.Tensor, u0: int) -> torch.Tensor:
        """out += x R[:, u0:u0 + x.shape[1]]^T in place, one block of R at a time (no concatenation)."""
        pos = 0
        for j, a, b in self._spans(u0, u0 + x.shape[1]):
            r = self._block(j, out.device)[:, a:b].to(out.dtype)
            out.addmm_(x[:, pos:pos + b - a], r.t())
            pos += b - a
            del r  # so an uncached block is freed before the next one is drawn
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_dim) -> x R^T (B, sketch_dim), in float32 (float64 for float64 x)."""
        if self.sketch_dim == 0:
            return x
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"SketchProjection expects (batch, {self.in_dim}), got {tuple(x.shape)}")
        dtype = _compute_dtype(x)
        out = torch.zeros(x.shape[0], self.sketch_dim, dtype=dtype, device=x.device)
        return self.accumulate(out, x.to(dtype), 0)


class FeatureShape(NamedTuple):
    """The sizes `output_layer_features` works on: B samples of T tokens, hidden size d, vocabulary V, and
    n = `supervised`, the largest number of supervised positions in one sample (None: T - 1, its bound)."""

    B: int
    T: int
    d: int
    V: int
    supervised: int | None = None


def peak_feature_memory_bytes(shape: FeatureShape, vocab_chunk: int, sketch_dim: int, *, dtype_bytes: int = 4,
                              sketch_block: int = 4096, logits_bytes: int | None = None) -> int:
    """Peak extra memory, in bytes, that `output_layer_features` allocates beyond its inputs.

    s = dtype_bytes of the compute dtype (4 float32, 8 float64); n = `shape.supervised`, the largest number
    of supervised positions in one sample (default T - 1, its upper bound); N = B n packed rows;
    c = min(vocab_chunk, V); k = sketch_dim; K = k if k > 0 else V; e = logits_bytes (default s):

        persistent = s (N d + B K) + (2 s + 56) N + 4096
                     packed weighted hidden, the result, per-row indices and vectors, scalars
        chunk      = max( s (N c + B c d),           delta chunk + gradient chunk (at the bmm)
                          s N c + X,                 delta chunk while it is gathered
                          s (B c d + c d + B c),     gradient chunk * inv_sqrt_v chunk -> row norms
                          2 s B c + P )              row norms (+ a column slice) -> sketch
        peak       = persistent + chunk

    X = e min(1024, N) c: rows gathered in the logits' dtype before conversion, when e != s (bf16 logits).
    P = one block of R while it is used: 4 k min(sketch_block, V) when R is not cached (k V 4 bytes
    > 256 MiB, the SketchProjection default), plus 8 k min(sketch_block, V) for its float64 copy when
    s = 8; P = 0 when k = 0. R's cached blocks belong to the SketchProjection and are not counted. The
    logsumexp pass holds s N c + X, within the chunk term. Nothing grows with B V d, and prompt tokens
    and padding cost nothing: only supervised rows are packed. tests/unit/test_scoring.py checks this
    bound against the torch profiler's allocation trace of real runs.
    """
    B, T, d, V, supervised = shape
    n = max(int(T) - 1, 0) if supervised is None else int(supervised)
    rows, c, k, s = int(B) * n, min(int(vocab_chunk), int(V)), int(sketch_dim), int(dtype_bytes)
    e = s if logits_bytes is None else int(logits_bytes)
    out = k if k > 0 else V
    persistent = s * (rows * d + B * out) + (2 * s + 56) * rows + 4096
    convert = e * min(_CONVERT_ROWS, rows) * c if e != s else 0
    block = 0
    if k > 0:
        cols = min(int(sketch_block), int(V))
        block = (0 if k * V * 4 <= _SKETCH_CACHE_BYTES else 4 * k * cols) + (8 * k * cols if s == 8 else 0)
    chunk = max(s * (rows * c + B * c * d), s * rows * c + convert, s * (B * c * d + c * d + B * c),
                2 * s * B * c + block)
    return persistent + chunk
