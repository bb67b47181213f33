"""Selector: the stateful wrapper the trainer calls each step around the pure `select`."""
from __future__ import annotations

import torch

from .config import SelectionConfig, SelectionResult
from .methods import Candidates, select

_STEP_STRIDE = 1_000_003  # prime, so (seed, step) pairs map to distinct generator seeds


def step_generator(seed: int, step: int) -> torch.Generator:
    """A fresh CPU generator that depends only on (seed, step)."""
    return torch.Generator().manual_seed((int(seed) * _STEP_STRIDE + int(step)) % (1 << 63))


class Selector:
    """Calls `select` with a generator seeded from (config.seed, step), so each step's choice is a
    pure function of seed and step and a resumed run chooses exactly as the original did."""

    def __init__(self, config: SelectionConfig, total_steps: int | None = None):
        if not isinstance(config, SelectionConfig):
            raise TypeError(f"config must be a SelectionConfig, got {type(config).__name__}")
        self.config = config
        self.total_steps = total_steps  # steps 1..total_steps; training progress for a temperature schedule
        self.calls = 0
        self.last_step = None

    def progress(self, step: int) -> float:
        """Fraction of training done at `step` (1-based): 0 at the first step, 1 at the last."""
        if not self.total_steps or self.total_steps <= 1:
            return 0.0
        return min(max((int(step) - 1) / (self.total_steps - 1), 0.0), 1.0)

    def __call__(self, step: int, candidates: Candidates, budget: int) -> SelectionResult:
        """`select` at `step` (see its arguments), with the step's generator and training progress."""
        result = select(candidates, budget, self.config, step_generator(self.config.seed, step),
                        progress=self.progress(step))
        self.calls += 1
        self.last_step = int(step)
        result.info["step"] = int(step)
        return result

    def state_dict(self) -> dict:
        return {"method": self.config.method, "seed": self.config.seed, "calls": self.calls,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore the counters. The current config wins; returns one warning per setting the checkpoint
        was written with differently (the caller logs them: this class does no I/O)."""
        warnings = []
        for key in ("method", "seed"):
            saved, now = state.get(key), getattr(self.config, key)
            if saved is not None and saved != now:
                warnings.append(f"selection {key} differs: checkpoint has {saved!r}, config has {now!r}; "
                                f"using the config's {now!r}")
        self.calls = int(state.get("calls", 0))
        self.last_step = state.get("last_step")
        return warnings
