"""The epoch sampler: the same stream of dataset indices on every rank, without communication.

Epoch e visits the dataset in the order of a permutation seeded by (seed, e) (numpy PCG64, so
the order is the same on every platform and numpy version). `draw(n)` hands out the next n
indices of the current epoch. When fewer than n indices remain, the epoch ends there: the
leftover indices are dropped for that epoch (like drop_last) and the draw comes from the start
of the next epoch's permutation. Dropping, rather than carrying the leftover into the next
draw, keeps every draw free of repeats; since each epoch has its own permutation, a different
handful of samples sits out each epoch.
"""
from __future__ import annotations

import numpy as np

from optbatch_ds.errors import ConfigError, ResumeError


class EpochSampler:
    def __init__(self, num_samples: int, seed: int):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    @property
    def remaining(self) -> int:
        """Indices left in the current epoch."""
        return self.num_samples - self.position

    def draw(self, n: int) -> list[int]:
        """The next n dataset indices (all distinct); starts a new epoch when fewer than n remain."""
        if not 0 < n <= self.num_samples:
            raise ConfigError(f"cannot draw {n} indices per step from a dataset of {self.num_samples} samples; "
                             "use a smaller batch (or prune ratio) or more data")
        if self.remaining < n:
            self.epoch += 1
            self.position = 0
        out = self.permutation(self.epoch)[self.position:self.position + n].tolist()
        self.position += n
        return out

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, d: dict) -> list[str]:
        """Resume. The dataset size must match (ResumeError); a different seed is a warning and the
        checkpoint's wins (the data order is the checkpoint's). Returns the warnings for the caller to log."""
        if int(d["num_samples"]) != self.num_samples:
            raise ResumeError(f"sampler checkpoint is for {d['num_samples']} samples but the dataset has "
                              f"{self.num_samples}; resume with the same data (and the same skip settings)")
        warnings = []
        if int(d["seed"]) != self.seed:
            warnings.append(f"sampler seed {d['seed']} from the checkpoint replaces the configured seed {self.seed}")
            self.seed = int(d["seed"])
            self._perm_epoch = -1
        self.epoch = int(d["epoch"])
        self.position = int(d["position"])
        return warnings
