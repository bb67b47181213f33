"""Step 4 of OptBatch and the baselines: pure selection functions (no torch.distributed, no I/O).

    from optbatch_ds.selection import SelectionConfig, Selector
    selector = Selector(SelectionConfig(method="optbatch", strata=3, temperature=1.0, seed=0))
    result = selector(step, Candidates(losses, sketches), budget)   # result.indices, result.weights, result.info
"""
from .config import METHODS, SelectionConfig, SelectionError, SelectionResult
from .farthest import mean_nn_distance
from .methods import Candidates, select
from .selector import Selector, step_generator

__all__ = ["METHODS", "Candidates", "SelectionConfig", "SelectionError", "SelectionResult", "Selector",
           "mean_nn_distance", "select", "step_generator"]
