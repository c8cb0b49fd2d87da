"""bench.py keeps running: `--quick` exits 0 and writes finite, positive headline ratios (no timing asserts)."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINES = ("moe_ffn_vs_dense", "student_step_vs_dense", "inference_vs_dense", "distill_vs_teacher_forward")


def test_bench_quick_writes_finite_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    sections = [res] + ([res["cuda"]] if res.get("cuda") else [])
    for sec in sections:
        for key in HEADLINES:
            assert math.isfinite(sec[key]) and sec[key] > 0, (key, sec[key])
        for row in sec["rows"]:
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
            assert row["min"] <= row["ratio"] <= row["max"] and row["rounds"] >= 2, row  # the median of its rounds
        assert all(len(v) == 2 for v in sec["load_avg"].values()) and "distill" in sec["load_avg"]
        assert 0 < sec["sweep"]["ratio"] and sec["sweep"]["saving"] == 1 - sec["sweep"]["ratio"]
    assert res["machine"]["threads"] >= 1 and res["machine"]["torch"] == __import__("torch").__version__
    n_rows = sum(len(sec["rows"]) for sec in sections)
    table = proc.stdout.rstrip().splitlines()[-n_rows:]  # the table is printed last
    assert all(line.endswith("smoke") for line in table), table  # tiny models: not judged against the targets
    assert "--quick: a smoke test on tiny models" in proc.stdout

    # --table reprints a saved run without measuring; given twice, every row differs by +0.0%
    again = subprocess.run([sys.executable, "bench.py", "--table", str(out), str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = again.stdout.rstrip().splitlines()[-n_rows:]
    assert [line.split()[-1] for line in lines] == ["+0.0%"] * n_rows, lines


def test_bench_authors_without_their_code_fails_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "bench.py", "--authors", str(tmp_path), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "cannot import the authors' models" in proc.stderr, proc.stderr[-2000:]


def test_device_check_runs_end_to_end_on_cpu(tmp_path):
    """The one-command GPU check at test size on CPU: bench rows, the compiled FFN, the CUDA tests (skipped
    here, which must not fail the check) and a short distillation, all in the JSON."""
    out = tmp_path / "device_check.json"
    cmd = [sys.executable, "bench.py", "--device_check", "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    sec = res["cuda"] or res  # the CUDA section on a GPU, else the CPU one
    check = sec["device_check"]
    assert check["tests"]["returncode"] == 0
    assert ("skipped" if res["cuda"] is None else "passed") in check["tests"]["summary"]
    d = check["short_distillation"]
    assert math.isfinite(d["first_loss"]) and math.isfinite(d["last_loss"]) and d["tokens_per_s"] > 0
    tokens = check["tokens_per_s"]
    assert {"dense", "loop"} <= set(tokens["ffn"]) and set(tokens["ffn_compiled"]) == {"dense", "moe"}
    assert min(*tokens["ffn"].values(), *tokens["ffn_compiled"].values(), tokens["distill_step"]) > 0
    assert any(r["name"].startswith("moe_ffn compiled") for r in sec["rows"])
    assert "short distillation (4 steps" in proc.stdout and "tests/test_cuda.py: " in proc.stdout
