"""The scripts import one way, minimoe <- runkeeping <- train_distill <- finetune <- eval (bench.py beside eval.py), each at
the top of its file; and they run without the test oracles (transformers, scikit-learn, ...)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"minimoe": set(), "runkeeping": {"minimoe"}, "train_distill": {"minimoe", "runkeeping"},
           "finetune": {"minimoe", "runkeeping"}, "eval": {"minimoe", "runkeeping", "train_distill", "finetune"},
           "bench": {"minimoe", "runkeeping", "train_distill"}}


def project_imports(name):
    """(project modules imported at the top of name.py, those imported inside a function or class)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            continue
        found = {m.split(".")[0] for m in modules} & set(ALLOWED)
        (top if node in tree.body else nested).update(found)
    return top, nested


@pytest.mark.parametrize("name", list(ALLOWED))
def test_scripts_import_one_way_at_the_top(name):
    top, nested = project_imports(name)
    assert top <= ALLOWED[name], f"{name}.py imports {top - ALLOWED[name]}: against minimoe <- runkeeping <- train_distill <- finetune <- eval"
    assert not nested, f"{name}.py imports {nested} inside a function"


def test_runtime_needs_none_of_the_test_oracles():
    blocked = ["transformers", "sentence_transformers", "sklearn", "scipy", "pandas"]  # `import x` raises
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
            "import minimoe, runkeeping, train_distill, finetune, eval\n"
            "teacher = minimoe.default_teacher(); minimoe.load_bert(teacher); minimoe.load_tokenizer(teacher)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("script", ["train_distill", "finetune", "eval", "bench"])
@pytest.mark.parametrize("mine", [None, "ACTIVE"])
def test_scripts_let_idle_threads_sleep_unless_told_otherwise(script, mine):
    """OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (spinning threads make a busy machine 2-3x slower),
    and a user's own setting wins."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if mine:
        env["OMP_WAIT_POLICY"] = mine
    code = f"import os, {script}; print(os.environ['OMP_WAIT_POLICY'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == (mine or "PASSIVE"), proc.stdout[-500:]
