"""Reliability: no silent NaN, no two runs on one directory, checksummed checkpoints, exact
resumes only, argument validation, early checks, no leaked temporary files, atomic finetuned
checkpoints, and `error: <message>` (exit 2) for user errors. Tiny configs, seconds each."""
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import minimoe as mm
import runkeeping as rk
import train_distill as td
from tests.test_train_distill import read_log, tiny_args, tiny_setup, tokenizer  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def dead_pid():
    """The pid of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def user_error(main, argv, capsys):
    """Run main(argv) as the command line does; return the `error: ...` line it printed (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        rk.run_script(lambda: main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return next(line for line in err if line.startswith(("error:", "usage:")) or ": error:" in line) if err else ""


# ----------------------------------------------------------------------------- 1. non-finite values


def test_divergence_stops_the_run_and_keeps_the_finite_checkpoints(tmp_path, tiny_setup):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"training diverged at step \d+: non-finite \(NaN/inf\) loss, gradients or "
                                         r"weights of student student .*the last checkpoint, .*step_\d+\.pt, is intact") as e:
        td.main(tiny_args(tiny_setup, out, "--max_steps", "30", "--lr", "1e30", "--warmup", "0", "--save_every", "1",
                          "--keep_last", "3", "--log_every", "100", "--eval_every", "100"))
    bad_step = int(str(e.value).split(" at step ")[1].split(":")[0])
    assert not (out / "student").exists()  # nothing non-finite is published
    kept = rk.checkpoints(out / "checkpoints")
    assert kept and int(kept[-1].stem[5:]) < bad_step
    for f in kept:  # every checkpoint left is finite and matches its checksum
        rk.load_checkpoint(f)
    assert all(r["step"] < bad_step for r in read_log(out))


def test_nonfinite_weights_are_refused_at_load(tmp_path, tiny_setup):
    teacher = tmp_path / "teacher"
    mm.save_bert(mm.load_bert(tiny_setup["teacher"]), teacher)
    data = bytearray((teacher / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # a valid safetensors header, then data bytes 0xff (NaN)
    data[header:] = b"\xff" * (len(data) - header)
    (teacher / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{teacher / 'model.safetensors'}: tensor '.*' has non-finite values"):
        mm.load_bert(teacher)
    ckpt = {"config": {"vocab_size": 10, "hidden_size": 8, "num_layers": 1, "num_heads": 2, "intermediate_size": 8},
            "model": {k: torch.full_like(v, float("nan")) for k, v in mm.Bert(mm.BertConfig(
                vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8)).state_dict().items()}}
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'nan.pt'}: tensor .* non-finite"):
        mm.load_bert(tmp_path / "nan.pt")


def test_finetune_never_keeps_a_diverged_model(tmp_path, tokenizer):
    import finetune as ft
    from tests.test_finetune import sst2_files, tiny_config
    model = mm.save_bert(mm.Bert(tiny_config()), tmp_path / "tiny", tokenizer=tokenizer)
    data = sst2_files(tmp_path / "SST-2")
    common = ["--task", "sst2", "--model", str(model), "--data_dir", str(data), "--epochs", "2", "--batch_size", "8",
              "--eval_every", "3", "--patience", "0", "--precision", "fp32"]
    best = ft.main(common + ["--out_dir", str(tmp_path / "ft"), "--lr", "1e-3,1e20"])
    assert best["lr"] == 1e-3  # 1e20 gives NaN weights, whose all-class-0 predictions score the majority accuracy
    meta = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert meta["lr"] == 1e-3 and meta["grid"]["1e+20"]["diverged_at"] == 3 and meta["grid"]["1e+20"]["score"] is None
    assert all(torch.isfinite(t).all() for t in ft.load_finetuned(tmp_path / "ft")[0].state_dict().values())
    with pytest.raises(SystemExit, match="no learning rate of --lr 1e20 gave a model with finite weights"):
        ft.main(common + ["--out_dir", str(tmp_path / "ft2"), "--lr", "1e20"])
    assert not (tmp_path / "ft2" / "finetune.json").exists()


# ----------------------------------------------------------------------------- 2. one run per directory


def hold_lock(directory):
    """Another process that holds directory's lock, as a run does, until it is killed."""
    code = "import sys, time, runkeeping\nrunkeeping.lock_out_dir(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(300)"
    p = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_the_same_out_dir_is_refused(tmp_path, tiny_setup):
    out = tmp_path / "run"
    other = hold_lock(out)  # a live run
    try:
        with pytest.raises(SystemExit, match=rf"{out} is in use by another run \(pid {other.pid} on "
                                             rf"{socket.gethostname()}, lock file {out / '.lock'}\)"):
            td.main(tiny_args(tiny_setup, out, "--max_steps", "2"))
        assert not (out / "checkpoints").exists()
    finally:
        other.kill()  # a kill -9: the kernel releases its lock; its lock file (with its dead pid) stays
        other.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == other.pid
    td.main(tiny_args(tiny_setup, out, "--max_steps", "2"))  # a lock whose process died is simply free
    rk.release_lock(out / ".lock")  # what exiting does
    assert not (out / ".lock").exists()
    other = hold_lock(out)  # released: another process takes it at once
    other.kill()
    other.wait()

    # the finished run's command again: refused, unless --resume or --overwrite
    before = (out / "log.jsonl").read_text()
    with pytest.raises(SystemExit, match=rf"{out} holds a previous run .*step_0000002.pt.*: pass --resume to continue "
                                         "it, --overwrite to start afresh"):
        td.main(tiny_args(tiny_setup, out, "--max_steps", "2"))
    assert (out / "log.jsonl").read_text() == before
    td.main(tiny_args(tiny_setup, out, "--max_steps", "2", "--overwrite"))
    assert [r["step"] for r in read_log(out) if "loss" in r] == [2]


# ----------------------------------------------------------------------------- 3. damaged checkpoints


def test_damaged_checkpoints_are_detected_and_skipped(tmp_path, tiny_setup, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_setup, out, "--max_steps", "4", "--save_every", "1", "--log_every", "1", "--eval_every", "100")
    td.main(args)
    ckpts = rk.checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step_0000002.pt", "step_0000003.pt", "step_0000004.pt"]
    assert (out / "checkpoints" / "step_0000004.pt.sha256").read_text().split()[1] == "step_0000004.pt"
    data = bytearray(ckpts[-1].read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)  # random bytes inside: the zip still opens
    ckpts[-1].write_bytes(bytes(data))
    ckpts[-2].write_bytes(ckpts[-2].read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=rf"{ckpts[-1]}: the sha256 checksum does not match"):
        rk.load_checkpoint(ckpts[-1])
    with pytest.raises(SystemExit):  # an explicit, damaged file: no fallback
        rk.run_script(lambda: td.main(args + ["--resume", str(ckpts[-1])]))
    assert f"error: {ckpts[-1]}: the sha256 checksum does not match" in capsys.readouterr().err

    td.main(args[:-6] + ["--max_steps", "6", "--save_every", "1", "--log_every", "1", "--eval_every", "100", "--resume"])
    err = capsys.readouterr().err
    assert f"{ckpts[-1]}: the sha256 checksum does not match" in err and f"{ckpts[-2]}: " in err
    assert "falling back to the previous checkpoint" in err
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # resumed from step 2
    for c in rk.checkpoints(out / "checkpoints"):
        rk.load_checkpoint(c)  # the damaged ones were written again


# ----------------------------------------------------------------------------- 4. resume with other flags


def test_resume_refuses_flags_that_break_an_exact_resume(tmp_path, tiny_setup):
    out = tmp_path / "run"
    base = tiny_args(tiny_setup, out, "--save_every", "2", "--eval_every", "100")
    td.main(base + ["--max_steps", "2"])
    with pytest.raises(SystemExit, match=r"--resume: .*step_0000002.pt was trained with other values of --lr 0.0003 "
                                         r"\(now 0.01\), --batch_size 8 \(now 16\)\. .*Flags that may change on resume: "
                                         r"--max_steps, --epochs"):
        td.main([a if a != "8" else "16" for a in base] + ["--max_steps", "4", "--lr", "0.01", "--resume"])
    td.main(base + ["--max_steps", "4", "--log_every", "1", "--keep_last", "1", "--resume"])  # allowed changes
    assert [r["step"] for r in read_log(out) if "loss" in r] == [2, 3, 4]
    assert [c.name for c in rk.checkpoints(out / "checkpoints")] == ["step_0000004.pt"]


# ----------------------------------------------------------------------------- 5. argument validation


@pytest.mark.parametrize("flag, value, message", [
    ("--max_steps", "-3", "argument --max_steps: must be an integer >= 1, got '-3'"),
    ("--max_steps", "0", "argument --max_steps: must be an integer >= 1, got '0'"),
    ("--batch_size", "0", "argument --batch_size: must be an integer >= 1, got '0'"),
    ("--batch_size", "-8", "argument --batch_size: must be an integer >= 1, got '-8'"),
    ("--micro_batch_size", "0", "argument --micro_batch_size: must be an integer >= 1"),
    ("--num_relation_heads", "0", "argument --num_relation_heads: must be an integer >= 1"),
    ("--save_every", "0", "argument --save_every: must be an integer >= 1"),
    ("--log_every", "0", "argument --log_every: must be an integer >= 1"),
    ("--eval_every", "0", "argument --eval_every: must be an integer >= 1"),
    ("--eval_pairs", "0", "argument --eval_pairs: must be an integer >= 1"),
    ("--keep_last", "0", "argument --keep_last: must be an integer >= 1"),
    ("--epochs", "0", "argument --epochs: must be a number > 0, got '0'"),
    ("--lr", "nan", "argument --lr: must be a number >= 0, got 'nan'"),
    ("--warmup", "2", "argument --warmup: must be a number >= 0 and <= 1, got '2'"),
    ("--heads", "0", "argument --heads: must be an integer >= 1"),
])
def test_train_distill_validates_its_arguments(flag, value, message, tiny_setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        td.parse_args(tiny_args(tiny_setup, tmp_path, flag, value))
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    ("finetune", ["--task", "rte", "--epochs", "0"], "argument --epochs: must be a number > 0"),
    ("finetune", ["--task", "rte", "--batch_size", "0"], "argument --batch_size: must be an integer >= 1"),
    ("finetune", ["--task", "rte", "--lr", "3e-5,x"], "argument --lr: each learning rate must be a number, got 'x'"),
    ("finetune", ["--task", "rte", "--log_every", "0"], "argument --log_every: must be an integer >= 1"),
    ("eval", ["--tasks", "all", "--batch_size", "0"], "argument --batch_size: must be an integer >= 1"),
    ("eval", ["--compute", "--iters", "0"], "argument --iters: must be an integer >= 1"),
])
def test_finetune_and_eval_validate_their_arguments(script, argv, message, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_validates_its_arguments(tmp_path):
    for argv, message in ((["--repeats", "0"], "argument --repeats: must be an integer >= 1"),
                          (["--json", str(tmp_path)], "not a writable file path")):
        r = subprocess.run([sys.executable, "bench.py", "--quick", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_eval_json_path_is_checked_first_and_its_folder_made(tmp_path, capsys):
    import eval as ev
    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--tasks", "all", "--json", str(tmp_path)])
    assert e.value.code == 2 and "not a writable file path" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--tasks", "all", "--json", str(tmp_path / "file" / "t.json")])
    assert e.value.code == 2 and "cannot create" in capsys.readouterr().err
    ev.parse_args(["--tasks", "all", "--json", str(tmp_path / "new" / "deeper" / "t.json")])
    assert (tmp_path / "new" / "deeper").is_dir()


# ----------------------------------------------------------------------------- 6. early checks


def test_out_dir_is_checked_before_the_corpus_is_read(tmp_path, tiny_setup, monkeypatch):
    monkeypatch.setattr(td, "build_pairs", lambda *a, **k: pytest.fail("the corpus was read first"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=rf"--out_dir {tmp_path / 'file'}: exists and is not a directory"):
        td.main(tiny_args(tiny_setup, tmp_path / "file", "--max_steps", "1"))
    with pytest.raises(SystemExit, match=rf"--out_dir {tmp_path / 'file' / 'sub'}: cannot be created"):
        td.main(tiny_args(tiny_setup, tmp_path / "file" / "sub", "--max_steps", "1"))


def test_finetune_checks_example_lengths_against_the_model_before_training(tmp_path, tokenizer, monkeypatch):
    import finetune as ft
    from tests.test_finetune import sst2_files, tiny_config
    model = mm.save_bert(mm.Bert(tiny_config(max_position_embeddings=16)), tmp_path / "tiny", tokenizer=tokenizer)
    data = sst2_files(tmp_path / "SST-2")
    with open(data / "train.tsv", "a") as f:
        f.write(" ".join(["word"] * 40) + "\t1\n")
    monkeypatch.setattr(ft, "configure_optimizer", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit, match=r"--max_length 128: examples of up to 42 tokens, but .* has 16 positions; "
                                         r"pass --max_length 16"):
        ft.main(["--task", "sst2", "--model", str(model), "--data_dir", str(data), "--out_dir", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- 7. no leaked temporary files


def test_failed_and_killed_saves_leave_no_temporary_files(tmp_path, tiny_setup, monkeypatch):
    path = tmp_path / "ckpt" / "step_0000001.pt"
    rk.atomic_save({"a": torch.ones(2)}, path, checksum=True)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        rk.atomic_save({"a": torch.zeros(2)}, path, checksum=True)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_0000001.pt", "step_0000001.pt.sha256"]
    assert torch.load(path, weights_only=True)["a"].sum() == 2  # the old file, whole

    # what a kill -9 leaves: a checkpoint's temporary file, an orphan checksum, a half-built pair cache
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".step_0000007.pt.tmp4242").write_bytes(b"x" * 100)
    (out / "checkpoints" / "step_0000007.pt.sha256").write_text("0  step_0000007.pt\n")
    cache = tmp_path / "cache"
    stale = cache / f".build-{socket.gethostname()}-{dead_pid()}-abc123"
    (stale / "docs").mkdir(parents=True)
    other = cache / ".build-otherhost-1-abc123"  # another machine's build may be running: kept
    other.mkdir()
    td.main(tiny_args(dict(tiny_setup, cache=str(cache)), out, "--max_steps", "1"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001.pt", "step_0000001.pt.sha256",
                                                                       "tokenizer.json"]
    assert not stale.exists() and other.exists()


# ----------------------------------------------------------------------------- 8. atomic finetuned checkpoints


def test_finetuned_checkpoint_is_replaced_as_a_set(tmp_path, tokenizer, monkeypatch):
    import finetune as ft
    from tests.test_finetune import tiny_config
    torch.manual_seed(0)
    old_model, new_model = (ft.TaskModel(mm.Bert(tiny_config()), "cls", 2) for _ in range(2))
    out = tmp_path / "ft"
    out.mkdir()
    ft.save_finetuned(old_model, out, tokenizer, dict(task="sst2", kind="cls", num_labels=2, step=1))
    real_replace, moved = os.replace, []

    def killed_while_moving(src, dst):  # the kill lands after two files of the new set were moved in
        if Path(src).parent.name == ".saving" and Path(dst).parent == out:  # not the atomic writes inside .saving
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_while_moving)
    with pytest.raises(KeyboardInterrupt):
        ft.save_finetuned(new_model, out, tokenizer, dict(task="sst2", kind="cls", num_labels=2, step=2))
    monkeypatch.undo()
    loaded, _, meta = ft.load_finetuned(out)  # finishes the interrupted move: the new set, whole
    assert meta["step"] == 2 and not (out / ".saving").exists()
    for k, v in new_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    def killed_while_writing(*a, **k):  # before the set is complete: the old one stays
        raise KeyboardInterrupt
    monkeypatch.setattr(ft, "write_json", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        ft.save_finetuned(old_model, out, tokenizer, dict(task="sst2", kind="cls", num_labels=2, step=3))
    monkeypatch.undo()
    loaded, _, meta = ft.load_finetuned(out)
    assert meta["step"] == 2 and torch.equal(loaded.classifier.weight, new_model.classifier.weight)


# ----------------------------------------------------------------------------- 9. log.jsonl on resume


def test_truncate_log_drops_later_steps_and_a_cut_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "heldout_rel": {}}\n{"step": 3}\n{"step": 4, "lo')
    rk.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "heldout_rel": {}}\n'


# ----------------------------------------------------------------------------- 10. user errors: `error: ...`, exit 2


def test_user_errors_print_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    def user():
        raise ValueError("x.tsv:3: something the user can fix")

    with pytest.raises(SystemExit) as e:
        rk.run_script(user)
    assert e.value.code == 2 and capsys.readouterr().err == "error: x.tsv:3: something the user can fix\n"
    with pytest.raises(SystemExit) as e:
        rk.run_script(lambda: (_ for _ in ()).throw(SystemExit("--out_dir x: not writable")))
    assert e.value.code == 2 and capsys.readouterr().err == "error: --out_dir x: not writable\n"
    with pytest.raises(KeyError):  # a bug: the traceback
        rk.run_script(lambda: {}["missing"])
    monkeypatch.setattr(sys, "argv", ["train_distill.py", "--debug"])
    with pytest.raises(ValueError):  # --debug: a traceback for user errors too
        rk.run_script(user)


def test_bad_config_json_is_named_with_what_to_fix(tmp_path, tiny_setup):
    good = json.loads((Path(tiny_setup["teacher"]) / "config.json").read_text())
    for name, config, message in (
            ("list", [good], "expected a JSON object of BERT settings, got a list"),
            ("types", {**good, "hidden_size": "32", "hidden_dropout_prob": "0.1"},
             "bad value(s) hidden_size='32', hidden_dropout_prob='0.1': sizes must be positive integers"),
            ("heads", {**good, "num_attention_heads": 0}, "bad value(s) num_attention_heads=0")):
        d = tmp_path / name
        mm.save_bert(mm.load_bert(tiny_setup["teacher"]), d)
        (d / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=rf"{d / 'config.json'}: " + message.replace("(", r"\(").replace(")", r"\)")):
            mm.load_bert(d)


def test_bad_tsv_files_are_named(tmp_path):
    import finetune as ft
    task = ft.get_task("sst2")
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("sentence\tlabel\ngood\t1\ncaf\xe9 au lait\t1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin1}:3: not valid UTF-8 \(byte 0xe9, the line's byte 4\); convert"):
        ft.read_glue(task, latin1)
    old_mac = tmp_path / "cr.tsv"
    old_mac.write_text("sentence\tlabel\r" + "a good film\t1\r" * 500)
    with pytest.raises(ValueError, match=rf"{old_mac}: lines end in a bare carriage return") as e:
        ft.read_glue(task, old_mac)
    assert len(str(e.value)) < 300  # not the whole file


def test_truncated_pair_cache_says_which_directory_to_delete(tmp_path, tokenizer, tiny_setup):
    pairs = td.build_pairs(tiny_setup["corpus"], tokenizer, tmp_path / "cache", max_seq_length=32)
    arrow = Path(pairs["train"].cache_files[0]["filename"])
    del pairs
    arrow.write_bytes(arrow.read_bytes()[:len(arrow.read_bytes()) // 2])
    final = arrow.parent.parent
    with pytest.raises(ValueError, match=rf"the pair cache {final} is damaged .*delete the cache directory {final} and "
                                         "run again"):
        td.build_pairs(tiny_setup["corpus"], tokenizer, tmp_path / "cache", max_seq_length=32)


def test_missing_runs_directory_is_an_error(tmp_path):
    r = subprocess.run([sys.executable, "eval.py", "--tasks", "all", "--runs", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.strip() == f"error: --runs {tmp_path / 'nope'}: no such directory " \
                                                     "(give the --out_dir parent of finetune.py runs)", r.stderr


# ----------------------------------------------------------------------------- 11. tokenizer mismatch


def test_a_tokenizer_other_than_the_teachers_is_refused_unless_forced(tmp_path, tiny_setup, tokenizer):
    vocab = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    for name, words in (("smaller", vocab[:20000]), ("swapped", vocab[:2000] + [vocab[2001], vocab[2000]] + vocab[2002:])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vocab.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
    args = lambda out, tok: tiny_args(tiny_setup, tmp_path / out, "--max_steps", "1", "--tokenizer", str(tmp_path / tok))  # noqa
    with pytest.raises(SystemExit, match="the tokenizer has 20000 tokens but the teacher's embedding table 30522 rows: "
                                         "pass the teacher's own tokenizer .*or --force_tokenizer"):
        td.main(args("a", "smaller"))
    with pytest.raises(SystemExit, match=r"--tokenizer .*swapped: its vocabulary differs from the teacher's own"):
        td.main(args("b", "swapped"))
    td.main(args("c", "swapped") + ["--force_tokenizer"])
    assert mm.load_tokenizer(tmp_path / "c" / "student").token_to_id(vocab[2000]) == 2001  # what was asked for


# ============================================================================= disk, signals, resume, tracebacks
# ----------------------------------------------------------------------------- 12. a full disk


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail as on a full disk (RLIMIT_FSIZE; SIGXFSZ ignored: write() returns EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_in_torch_save_is_an_error_naming_the_file(tmp_path, tiny_setup, capsys):
    path = tmp_path / "ckpt" / "step_0000001.pt"
    with file_size_limit(1 << 20):  # torch's zip writer turns the OSError into RuntimeError("unexpected pos")
        with pytest.raises(OSError, match=rf"{path}: could not be written \(RuntimeError: .*inline_contain"):
            rk.atomic_save({"a": torch.zeros(1 << 19)}, path, checksum=True)
        student = tmp_path / "student"
        with pytest.raises(OSError, match=rf"{student / 'model.safetensors'}: could not be written"):
            mm.save_bert(mm.load_bert(tiny_setup["teacher"]), student)
    assert not list(path.parent.iterdir()) and not list((tmp_path / "student").glob(".*"))
    out = tmp_path / "run"
    with file_size_limit(2 << 20):  # a checkpoint of the tiny run: ~12 MB
        line = user_error(td.main, tiny_args(tiny_setup, out, "--max_steps", "2", "--save_every", "1"),
                          capsys)
    ckpt = out / "checkpoints" / "step_0000001.pt"
    assert line.startswith(f"error: {ckpt}: could not be written (RuntimeError")
    assert line.endswith("is the disk full?")


def test_stale_temporary_files_go_from_every_student_and_finetune_directory(tmp_path, tiny_setup, tokenizer):
    out = tmp_path / "run"
    left = [out / "student" / ".model.safetensors.tmp4242", out / "moe" / "student" / ".config.json.tmp77",
            out / "student_dense" / ".vocab.txt.tmp5"]  # what a kill during the final save_bert leaves
    for f in left:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * 100)
    td.main(tiny_args(tiny_setup, out, "--max_steps", "1", "--overwrite"))
    assert not any(f.exists() for f in left)

    import finetune as ft
    from tests.test_finetune import sst2_files, tiny_config
    model = mm.save_bert(mm.Bert(tiny_config()), tmp_path / "tiny", tokenizer=tokenizer)
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / ".finetune.json.tmp99").write_text("{")
    data = sst2_files(tmp_path / "SST-2")
    ft.main(["--task", "sst2", "--model", str(model), "--data_dir", str(data), "--out_dir",
             str(tmp_path / "ft"), "--max_steps", "1", "--batch_size", "8", "--precision", "fp32",
             "--no_save"])
    assert not (tmp_path / "ft" / ".finetune.json.tmp99").exists()


# ----------------------------------------------------------------------------- 13. SIGTERM building pairs


def children(pid):
    return {int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()}


def running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_while_building_pairs_ends_the_worker_processes(tmp_path, tiny_setup):
    from tests.test_train_distill import write_corpus
    (tmp_path / "corpus").mkdir()
    for i in range(2):  # two files: two reader processes; 6000 documents: two map workers, busy for a while
        write_corpus(tmp_path / "corpus" / f"{i}.txt", docs=3000, seed=i)
    cache = tmp_path / "cache"
    argv = ["train_distill.py", "--prepare_only", "--corpus", str(tmp_path / "corpus"), "--teacher",
            tiny_setup["teacher"], "--cache_dir", str(cache), "--num_proc", "2", "--max_seq_length", "32"]
    p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = set()
    while p.poll() is None and len(seen) < 2:
        seen |= children(p.pid)
        time.sleep(0.02)
    assert p.poll() is None, "the build ended before it could be stopped: make the corpus larger"
    p.send_signal(signal.SIGTERM)  # a plain `kill`: the process alone, not its group
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    deadline = time.time() + 10
    while any(running(c) for c in seen) and time.time() < deadline:
        time.sleep(0.1)
    assert not [c for c in seen if running(c)]  # no orphan worker
    again = subprocess.run([sys.executable, *argv], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list(cache.glob(".build-*"))  # the next start removed the partial build


# ----------------------------------------------------------------------------- 14. resume inside a log window


def test_resume_inside_a_log_window_logs_as_the_uninterrupted_run(tmp_path, tiny_setup, capsys):
    def args(out):
        return tiny_args(tiny_setup, out, "--max_steps", "6", "--save_every", "2", "--log_every", "3",
                         "--keep_last", "5", "--eval_every", "100")
    td.main(args(tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000004.pt"  # inside the window of steps 4-6
    td.main(args(tmp_path / "b") + ["--resume", str(ckpt)])  # resumed into another --out_dir
    whole, resumed = ([r for r in read_log(tmp_path / d) if "loss" in r] for d in "ab")
    drop = lambda r: {k: v for k, v in r.items() if k != "tok_per_s"}  # noqa: E731 (time: not reproducible)
    assert [drop(r) for r in resumed] == [drop(whole[-1])]
    assert (tmp_path / "b" / "checkpoints" / "tokenizer.json").exists()  # its checkpoints can be a --teacher

    # a checkpoint written before the window was saved still resumes
    old = torch.load(ckpt, weights_only=True)
    for r in old["rng"]:
        del r["log_window"]
    rk.atomic_save(old, tmp_path / "old" / "step_0000004.pt", checksum=True)
    td.main(args(tmp_path / "c") + ["--resume", str(tmp_path / "old" / "step_0000004.pt")])
    assert [r["step"] for r in read_log(tmp_path / "c") if "loss" in r] == [6]

    # a damaged results.json (an interrupted copy) does not stop a resume; it is named
    (tmp_path / "a" / "results.json").write_text('{"students": {"stud')
    td.main(args(tmp_path / "a")[:-8] + ["--max_steps", "7", "--save_every", "2", "--log_every", "3",
                                         "--resume"])
    assert f"{tmp_path / 'a' / 'results.json'}: not valid JSON" in capsys.readouterr().err


def test_an_empty_checksum_file_falls_back_to_the_previous_checkpoint(tmp_path, tiny_setup, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_setup, out, "--save_every", "1", "--eval_every", "100", "--log_every", "1")
    td.main(args + ["--max_steps", "2"])
    sha = out / "checkpoints" / "step_0000002.pt.sha256"
    sha.write_text("")
    td.main(args + ["--max_steps", "3", "--resume"])
    assert f"{sha}: empty or not a sha256 checksum file (damaged): falling back" in capsys.readouterr().err
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3]  # resumed from step 1


# ----------------------------------------------------------------------------- 15. malformed inputs


@pytest.mark.parametrize("field, value, message", [
    ("pad_token_id", 99999, "pad_token_id=99999 (must be a token id"),
    ("pad_token_id", "0", "pad_token_id='0' (must be a token id"),
    ("hidden_dropout_prob", 5, "hidden_dropout=5 (must be a probability in [0, 1))"),
    ("layer_norm_eps", -1, "layer_norm_eps=-1 (must be a number > 0)"),  # not "training diverged"
    ("initializer_range", -0.5, "initializer_range=-0.5"),
])
def test_bad_config_values_are_blamed_on_the_teachers_config_at_load(field, value, message, tmp_path,
                                                                      tiny_setup, capsys):
    teacher = tmp_path / "teacher"
    mm.save_bert(mm.load_bert(tiny_setup["teacher"]), teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, field: value}))
    argv = tiny_args(tiny_setup, tmp_path / "run", "--max_steps", "1", "--tokenizer", tiny_setup["teacher"])
    argv[1] = str(teacher)
    line = user_error(td.main, argv, capsys)
    assert line.startswith(f"error: {teacher / 'config.json'}: bad value(s) ") and message in line


def test_a_teacher_with_non_finite_outputs_is_blamed_at_load():
    cfg = mm.BertConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8)
    teacher = mm.Bert(cfg)
    with torch.no_grad():
        teacher.emb.word.weight.fill_(3e38)  # finite weights whose sums overflow
    with pytest.raises(SystemExit, match="--teacher T: its outputs on a short input are not finite"):
        td.check_teacher(teacher, "T")


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", os.urandom(300), "tokenizer.json: not a valid tokenizer file"),
    ("tokenizer.json", b'{"version": "1.0"}', "tokenizer.json: not a valid tokenizer file"),
    ("vocab.txt", b"[PAD]\n\xff\xfe\x00binary\n", "vocab.txt: not a UTF-8 text file of tokens"),
    ("tokenizer_config.json", b"{do_lower_case: true", "tokenizer_config.json: invalid JSON"),
])
def test_bad_tokenizer_files_are_named(name, content, message, tmp_path, tokenizer, capsys):
    import finetune as ft
    from tests.test_finetune import tiny_config
    model = mm.save_bert(mm.Bert(tiny_config()), tmp_path / "m", tokenizer=tokenizer)
    if name != "tokenizer.json":  # the vocab.txt route
        (model / "tokenizer.json").unlink()
    (model / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{model / name}: "):
        mm.load_tokenizer(model)
    argv = ["--task", "sst2", "--model", str(model), "--out_dir", str(tmp_path / "o")]
    line = user_error(ft.main, argv, capsys)
    assert line.startswith(f"error: {model}/{message}")


@pytest.mark.parametrize("plan, message", [
    (dict(models=["a"], tasks=["sst2"]), "models must be an object"),
    (dict(models={"a": None}, tasks="sst2"), "tasks must be a list of task names"),
    (dict(models={"a": None}, tasks=["sst2"], seeds=1), "seeds must be a list of integers"),
    (dict(models={"a": None}, tasks=["sst3"]), "unknown task 'sst3'"),
    (dict(models={"a": "/no/such/student"}, tasks=["sst2"]), "no such model /no/such/student"),
])
def test_a_bad_plan_is_refused_before_anything_is_created(plan, message, tmp_path, capsys):
    import finetune as ft
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "out_dir": str(tmp_path / "d")}))
    line = user_error(ft.main, ["--plan", str(tmp_path / "plan.json")], capsys)
    assert line.startswith(f"error: --plan {tmp_path / 'plan.json'}: ") and message in line
    assert not (tmp_path / "d").exists()


def fake_run(root, meta):
    (root / "sst2").mkdir(parents=True)
    (root / "sst2" / "finetune.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return root / "sst2" / "finetune.json"


@pytest.mark.parametrize("meta, message", [
    (dict(task="sst2", metric="acc"), "lacks metrics"),
    ('{"task": "sst2", "metric": "acc", "metr', "not valid JSON"),
    (dict(task="sst2", metric="acc", metrics={"f1": 1.0}), "its metrics have no score of 'acc'"),
])
def test_eval_names_a_bad_finetune_json(meta, message, tmp_path, capsys):
    import eval as ev
    f = fake_run(tmp_path / "runs", meta)
    line = user_error(ev.main, ["--tasks", "sst2", "--runs", str(tmp_path / "runs"), "--cached"], capsys)
    assert line.startswith(f"error: {f}: ") and message in line


def test_eval_checks_its_runs_and_output_before_evaluating(tmp_path, capsys, monkeypatch):
    import eval as ev
    (tmp_path / "empty").mkdir()
    line = user_error(ev.main, ["--tasks", "all", "--runs", str(tmp_path / "empty")], capsys)
    assert line.startswith(f"error: --runs {tmp_path / 'empty'}: no finished finetune.py run of ")
    assert not list((tmp_path / "empty").iterdir())  # nothing written
    fake_run(tmp_path / "runs", dict(task="sst2", metric="acc", metrics={"acc": 0.5}, num_labels=2))
    (tmp_path / "out.json").mkdir()  # an output that cannot be written
    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated first"))
    with pytest.raises(SystemExit) as e:  # refused by argparse, before anything is read
        rk.run_script(lambda: ev.main(["--tasks", "sst2", "--runs", str(tmp_path / "runs"), "--json",
                                       str(tmp_path / "out.json")]))
    assert e.value.code == 2
    assert f"--json: not a writable file path: '{tmp_path / 'out.json'}'" in capsys.readouterr().err


def test_eval_writes_nothing_unasked(tmp_path, capsys):
    """Without --json the table is printed, and nothing lands in the runs directory."""
    import eval as ev
    fake_run(tmp_path / "runs", dict(task="sst2", metric="acc", metrics={"acc": 0.5}, num_labels=2))
    before = sorted(tmp_path.rglob("*"))
    ev.main(["--tasks", "sst2", "--runs", str(tmp_path / "runs"), "--cached"])
    assert "| runs |" in capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before


def test_bench_user_errors_go_through_the_shared_handler(tmp_path):
    (tmp_path / "dict.json").write_text("{}")
    (tmp_path / "list.json").write_text("[]")
    for flag, name, message in (("--table", "dict.json", "not a run"), ("--table", "list.json", "not a run"),
                                ("--authors", "missing", "no such directory")):
        r = subprocess.run([sys.executable, "bench.py", "--quick", flag, str(tmp_path / name)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        message = f"{flag} {tmp_path / name}: {message}"
        assert r.returncode == 2 and r.stderr.strip().startswith(f"error: {message}"), r.stderr[-2000:]


# ----------------------------------------------------------------------------- 16. finetune: one run a dir


def test_finetune_refuses_a_finished_out_dir_unless_overwrite(tmp_path, tokenizer, capsys):
    import finetune as ft
    from tests.test_finetune import sst2_files, tiny_config
    model = mm.save_bert(mm.Bert(tiny_config()), tmp_path / "tiny", tokenizer=tokenizer)
    out = tmp_path / "ft"
    data = sst2_files(tmp_path / "SST-2")
    common = ["--task", "sst2", "--model", str(model), "--data_dir", str(data), "--out_dir", str(out),
              "--epochs", "1", "--batch_size", "8", "--precision", "fp32"]
    ft.main(common + ["--lr", "1e-3"])
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    for extra in (["--lr", "1e20"], ["--lr", "1e-3", "--no_save"]):
        line = user_error(ft.main, common + extra, capsys)
        assert line.startswith(f"error: {out} holds a previous run (") and "pass --overwrite" in line
        assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"} == before
    with pytest.raises(SystemExit, match="no learning rate of --lr 1e20 gave a model"):  # not KeyError: 'lr'
        ft.main(common + ["--lr", "1e20", "--overwrite"])
    assert not (out / "finetune.json").exists()  # the old checkpoint went with --overwrite
    assert [r["event"] for r in read_log(out)].count("summary") == 1  # one run's log


# ----------------------------------------------------------------------------- 17. the objective, the CIs


def test_the_distillation_loss_is_relation_kl_plus_0_01_load_balance():
    torch.manual_seed(0)
    cfg = mm.BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=16,
                        num_experts=4, hidden_dropout=0.0, attention_dropout=0.0, router_noise=0.0)
    student, teacher = mm.Bert(cfg).train(), mm.Bert(cfg).eval()
    ids = torch.randint(1, 50, (3, 10))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    with torch.no_grad():
        t_qkv = teacher(ids, batch["attention_mask"], batch["token_type_ids"]).qkv
    loss, rel, lb, out = td.distill_loss(t_qkv, student, batch, num_relation_heads=2)  # default weight 0.01
    assert lb > 0 and torch.equal(lb, out.aux_loss)
    assert torch.equal(rel, mm.relation_loss(t_qkv, out.qkv, batch["attention_mask"], 2))
    assert loss.item() == pytest.approx(rel.item() + 0.01 * lb.item(), rel=1e-6)

    routers = [p for n, p in student.named_parameters() if "router" in n]

    def router_grads(pick):
        loss, rel, lb, _ = td.distill_loss(t_qkv, student, batch, num_relation_heads=2)
        return torch.autograd.grad(pick(loss, rel, lb), routers)
    total, g_rel, g_lb = (router_grads(f) for f in (lambda t, r, b: t, lambda t, r, b: r, lambda t, r, b: b))
    for t, r, b in zip(total, g_rel, g_lb):  # the router learns from both terms, load balance weighted 0.01
        assert r.abs().sum() > 0 and b.abs().sum() > 0
        torch.testing.assert_close(t, r + 0.01 * b, rtol=1e-5, atol=1e-8)


def test_paired_bootstrap_gives_a_95_percent_interval():
    import eval as ev
    rng = np.random.default_rng(1)
    n = 4000
    a, b = rng.normal(1.0, 1.0, n), rng.normal(0.5, 1.0, n)
    diff, lo, hi = ev.paired_bootstrap(a, b, np.ones(n))
    assert diff == pytest.approx((a - b).mean())
    half = 1.959964 * (a - b).std(ddof=1) / np.sqrt(n)  # the normal 95% interval of a mean: the known answer
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)  # an 80% interval would be 35% narrower
    assert lo < diff < hi and (diff - lo) == pytest.approx(hi - diff, rel=0.2)
