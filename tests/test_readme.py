"""The README's API example runs as written, offline, from another folder (the way its comment says to import
minimoe from elsewhere), and writes only where it says."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs_offline(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example; this test runs it"
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + blocks[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    loss = float(re.search(r"loss (\S+),", r.stdout).group(1))
    assert 0 < loss < 10  # a relation KL plus 0.01 x a load balance near 1
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written and all(p.startswith("runs/api_example/") for p in written), written
    import minimoe as mm
    back = mm.load_bert(tmp_path / "runs" / "api_example")
    assert back.config.num_experts == 4
