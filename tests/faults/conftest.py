import pytest


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One folder for every module of tests/faults, so they share one `.optbatch_cache` (model + demo data)."""
    path = tmp_path_factory.getbasetemp() / "faults"
    path.mkdir(exist_ok=True)
    return path
