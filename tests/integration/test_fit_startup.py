"""Start-up: tokenization happens once and is reused; flags the machine cannot honour stop the run before anything
loads, with one line and exit code 2.

    python -m pytest tests/integration/test_fit_startup.py -q -s      (-s shows the two start-up times)
"""
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration


def test_tokenization_cache_is_reused_on_a_second_start(tmp_path):
    """Two starts of the set-up every entry point shares: the first tokenizes through datasets.map into an Arrow
    file, the second finds it (a cache hit) and gets the same encoded set, pool and skip report. Timed, not asserted."""
    from optbatch_ds.config import RunConfig
    from optbatch_ds.session import prepare_data_and_model

    run = RunConfig(output_dir=str(tmp_path / "run"), max_seq_len=64, on_bad_record="skip")  # 64: some truncate
    times, preps = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        preps.append(prepare_data_and_model(run, local_rank=0, out=run.output_dir))
        times.append(time.perf_counter() - t0)
    first, second = preps
    assert first.encoded.cache_hit is False and second.encoded.cache_hit is True
    assert first.encoded.cache_files == second.encoded.cache_files
    assert all(f.startswith(str(tmp_path / ".optbatch_cache" / "tokenized")) for f in second.encoded.cache_files)
    assert first.pool == second.pool and len(second.pool) > 0
    assert first.report.events == second.report.events and first.report.events["truncated"] > 0
    assert first.report.skipped == second.report.skipped
    for i in (0, 1, len(first.encoded) - 1):
        assert first.encoded[i] == second.encoded[i]
    assert second.eval_encoded.cache_hit is True
    print(f"\nstart-up (data + tokenizer + tokenization, 3000 records): first {times[0]:.1f} s, second "
          f"{times[1]:.1f} s (cache hit)")


def _train(tmp_path, *flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", "--output-dir", str(out), *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.mark.parametrize("flags,message", [
    (("--use-peft", "--load-in-4bit"), "error: --load-in-4bit (QLoRA) quantizes with bitsandbytes on CUDA GPUs only"),
    (("--attn-implementation", "flash_attention_2"), "error: --attn-implementation flash_attention_2"),
])
def test_flags_the_machine_cannot_honour_stop_before_loading(tmp_path, flags, message):
    """On this CPU machine: one `error:` line, exit 2, and nothing built (no demo data, model or tokenized cache)."""
    proc, out = _train(tmp_path, *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".optbatch_cache").exists() and not (out / "config.json").exists()
