"""The package's seams: the error boundary of the entry points, what model loading turns into a user error,
and where collectives and imports may live (DESIGN §4: selection is pure, communication is comm's)."""
import ast
import os
import sys
import types

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.unit

PACKAGE = os.path.join(REPO, "optbatch_ds")


def _fake_module(monkeypatch, exc):
    mod = types.ModuleType("optbatch_fake_entry")

    def main(argv=None):
        raise exc

    mod.main = main
    monkeypatch.setitem(sys.modules, "optbatch_fake_entry", mod)
    return "optbatch_fake_entry"


def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys):
    from optbatch_ds.cli import run_main
    from optbatch_ds.config import ConfigError
    from optbatch_ds.data import DataError
    from optbatch_ds.errors import ResumeError
    from optbatch_ds.selection import SelectionError

    for exc in (ConfigError('"optbatch".strata: 0 must be >= 1'), DataError("f.jsonl:3", "output", "missing"),
                ResumeError("--resume x: no complete checkpoint below it"), SelectionError("only 3 of 24")):
        assert run_main(_fake_module(monkeypatch, exc)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError("budget=0 must be between 1 and 24"), RuntimeError("CUDA out of memory"),
                                 KeyError("lm_head.weight")])
def test_internal_errors_keep_their_traceback(monkeypatch, exc):
    """A bug or an environment failure is not reported as a user mistake: it propagates as itself."""
    from optbatch_ds.cli import run_main

    with pytest.raises(type(exc)):
        run_main(_fake_module(monkeypatch, exc))


def test_model_loading_blames_the_path_only_for_path_errors(monkeypatch, tmp_path):
    import transformers

    from optbatch_ds.errors import ConfigError
    from optbatch_ds.modeling import load_model

    def raising(exc):
        def from_pretrained(*a, **k):
            raise exc
        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        raising(OSError("no file named config.json")))
    with pytest.raises(ConfigError, match="Pass a local HF model directory"):
        load_model(str(tmp_path), {})
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        raising(MemoryError("out of memory while loading")))
    with pytest.raises(MemoryError):  # not "pass a local directory"
        load_model(str(tmp_path), {})


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, REPO), ast.parse(open(path, encoding="utf-8").read())


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "gather", "broadcast", "broadcast_object_list",
               "barrier", "reduce_scatter", "all_to_all", "scatter"}


def test_collectives_only_in_comm():
    """Every torch.distributed collective is called from optbatch_ds/comm.py, named for what it does."""
    stray = []
    for rel, tree in _modules():
        if rel == os.path.join("optbatch_ds", "comm.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                base = ast.unparse(node.value)
                if base in ("dist", "torch.distributed") or base.endswith(".distributed"):
                    stray.append(f"{rel}:{node.lineno} {base}.{node.attr}")
    assert not stray, stray


def _imports(tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)  # and `from pkg import module`: names that are modules are edges too
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_selection_is_pure_and_the_core_never_imports_bench():
    for rel, tree in _modules():
        imports = _imports(tree)
        if rel.startswith(os.path.join("optbatch_ds", "selection")):
            assert not {m for m in imports if m.startswith(("torch.distributed", "deepspeed", "optbatch_ds.comm"))}, rel
        if not rel.startswith(os.path.join("optbatch_ds", "bench")):
            assert not {m for m in imports if m.startswith("optbatch_ds.bench")}, rel
    comm = ast.parse(open(os.path.join(PACKAGE, "comm.py"), encoding="utf-8").read())
    assert not {m for m in _imports(comm) if m.startswith("optbatch_ds")}  # comm knows nothing of strata


def test_no_import_cycles():
    """The package's module import graph (imports anywhere in a file) is acyclic."""
    graph = {}
    for rel, tree in _modules():
        mod = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        graph[mod] = {m for m in _imports(tree) if m.startswith("optbatch_ds") and m != mod}
        if rel.endswith("__init__.py"):  # relative imports of a package's own modules
            graph[mod] |= {f"{mod}.{n.module}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        else:
            pkg = mod.rsplit(".", 1)[0]
            graph[mod] |= {f"{pkg}.{n.module}" for n in ast.walk(tree)
                           if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    state = {}

    def visit(m, path):
        if state.get(m) == "done" or m not in graph:
            return
        assert state.get(m) != "open", " -> ".join(path + [m])
        state[m] = "open"
        for n in graph[m]:
            visit(n, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])
