"""Every entry point starts: `--help` works and nothing in launch/ shadows the standard library."""
import glob
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("script", sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "launch", "*.py"))))
def test_help(script):
    proc = subprocess.run([sys.executable, os.path.join("launch", script), "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage" in proc.stdout.lower()
    docstring = open(os.path.join(REPO, "launch", script)).read().split('"""')[1]
    assert "Run as:" in docstring or "python launch/" in docstring  # the exact command that runs it


def test_unknown_flag_names_the_nearest():
    proc = subprocess.run([sys.executable, "launch/train.py", "--prune-ration", "0.3"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean '--prune-ratio'" in proc.stderr and "Traceback" not in proc.stderr
