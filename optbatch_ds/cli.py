"""Entry-point glue: turn the errors a user can fix (`errors.UserError`) into one clear line and exit code 2.

Every other exception is a bug or an environment failure and keeps its traceback."""
from __future__ import annotations

import importlib
import os
import sys

# Set before transformers / datasets are imported: nothing is downloaded at run time, no progress bars of
# theirs in our logs, no tokenizer thread pools fighting the ranks for cores.
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)


def run_main(module: str, argv=None) -> int:
    from optbatch_ds import comm
    from optbatch_ds.errors import UserError

    try:
        code = importlib.import_module(module).main(argv) or 0
    except UserError as exc:
        rank = os.environ.get("RANK", "0")
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {exc}", file=sys.stderr, flush=True)
        code = 2
    if comm.MULTI_RANK:
        # The work is done and written, the ranks have met at a barrier and the process group is destroyed.
        # Leave now: at interpreter teardown, gloo / DeepSpeed C++ threads are sometimes destroyed while
        # still joinable ("terminate called without an active exception", SIGABRT), turning a finished
        # run into a failed exit code (seen about once in 300 two-rank runs here).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
