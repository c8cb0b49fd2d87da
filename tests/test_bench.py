"""bench.py keeps running: `--quick` writes finite, positive headline ratios (no timing asserts) in rows named
for the tiny stand-ins they time and judged against no target; the committed runs still table; `import bench`
runs nothing."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parents[1]
HEADLINES = ("moe_ffn_vs_dense", "student_step_vs_dense", "inference_vs_dense", "distill_vs_teacher_forward")
REAL_SIZES = ("3L-384H", "6L-384H", "12L-768H")  # what the full run times; --quick rows must not claim them


@pytest.fixture
def threads():
    """bench.main(["--quick"]) sets torch to 1 thread: give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def table_lines(stdout, n_rows):
    return stdout.rstrip().splitlines()[-n_rows:]  # the table is printed last


def test_import_bench_runs_nothing(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench.py", "--quick", "--json", str(out)]
    code = f"import sys; sys.argv = {argv!r}; import bench; print(bench.main)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("<function main") and len(proc.stdout.splitlines()) == 1, proc.stdout
    assert not out.exists()


def test_bench_quick_writes_finite_ratios(tmp_path, capsys, threads):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--json", str(out)])
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    sections = [res] + ([res["cuda"]] if res.get("cuda") else [])
    for sec in sections:
        for key in HEADLINES:
            assert math.isfinite(sec[key]) and sec[key] > 0, (key, sec[key])
        for row in sec["rows"]:
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
            assert row["min"] <= row["ratio"] <= row["max"] and row["rounds"] >= 2, row  # its rounds' median
        assert all(len(v) == 2 for v in sec["load_avg"].values()) and "distill" in sec["load_avg"]
        assert 0 < sec["sweep"]["ratio"] and sec["sweep"]["saving"] == 1 - sec["sweep"]["ratio"]
    assert res["machine"]["threads"] >= 1 and res["machine"]["torch"] == torch.__version__
    rows = [row for sec in sections for row in sec["rows"]]
    table = table_lines(stdout, len(rows))
    assert all(line.endswith("smoke test: no target") for line in table), table
    assert "--quick: a smoke test on tiny stand-ins" in stdout

    # --table reprints a saved run without measuring; given twice, every row differs by +0.0%
    bench.main(["--table", str(out), str(out)])
    lines = table_lines(capsys.readouterr().out, len(rows))
    assert [line.split()[-1] for line in lines] == ["+0.0%"] * len(rows), lines


def test_quick_rows_name_the_stand_ins_and_carry_no_verdict(capsys, threads):
    """A --quick row times a tiny model, so it says so ("smoke", its real shape) and is judged
    against no target (a 7x ratio of a 64-wide FFN is no MISS of the 1.45x target of the real sizes)."""
    args = bench.build_parser().parse_args(["--quick"])
    b = bench.Bench("cpu", args)
    assert [b.shape(p) for p in REAL_SIZES] == ["1L-64H", "2L-64H", "4L-128H"]
    bench.student_section(b)
    bench.distill_section(b)
    capsys.readouterr()
    names = {r["name"] for r in b.rows}
    assert {"smoke student_step 1L-64H E=4 vs dense, 2x16",
            "smoke distill_step (4L-128H teacher + 2L-64H E=4) vs teacher fwd, 2x16"} <= names, names
    for row in b.rows:
        assert row["name"].startswith("smoke ") and row["target"] is None and row["ok"] is None, row
        assert not any(size in row["name"] for size in REAL_SIZES), row
    assert not any(size in key for key in b.mem for size in REAL_SIZES), b.mem
    full = bench.Bench("cpu", bench.build_parser().parse_args([]))  # the full run keeps the real names
    assert full.shape("3L-384H") == "3L-384H" and full.T == 128 and full.repeats == 7


def test_committed_runs_still_table():
    """The saved full runs print as before: every row judged (pass / MISS) and compared with run 2."""
    saved = json.loads((ROOT / "results" / "bench_cpu.json").read_text())
    cmd = [sys.executable, "bench.py", "--table", "results/bench_cpu.json", "results/bench_cpu_run2.json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = table_lines(proc.stdout, len(saved["rows"]))
    for row, line in zip(saved["rows"], lines):
        assert line.startswith(f"cpu {row['name']} ") and ("pass" if row["ok"] else "MISS") in line, line
        assert line.split()[-1].endswith("%"), line


def test_bench_authors_without_their_code_fails_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "bench.py", "--authors", str(tmp_path), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: --authors" in proc.stderr, proc.stderr[-2000:]
    assert "cannot import the authors' models" in proc.stderr, proc.stderr[-2000:]


def test_device_check_runs_end_to_end_on_cpu(tmp_path, capsys, threads):
    """The one-command GPU check at test size on CPU: bench rows, the compiled FFN, the CUDA tests (skipped
    here, which must not fail the check) and a short distillation, all in the JSON."""
    out = tmp_path / "device_check.json"
    bench.main(["--device_check", "--quick", "--json", str(out)])
    stdout = capsys.readouterr().out
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
    assert any(r["name"].startswith("smoke moe_ffn compiled") for r in sec["rows"])
    assert "short distillation (4 steps" in stdout and "tests/test_cuda.py: " in stdout
