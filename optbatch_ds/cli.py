"""Entry-point glue: turn the errors a user can fix into one clear line and exit code 2."""
from __future__ import annotations

import importlib
import os
import sys


def run_main(module: str, argv=None) -> int:
    from optbatch_ds.config import ConfigError
    from optbatch_ds.data import DataError

    try:
        return importlib.import_module(module).main(argv) or 0
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        rank = os.environ.get("RANK", "0")
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {exc}", file=sys.stderr, flush=True)
        return 2
