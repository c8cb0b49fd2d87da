"""Reliability (issue 10): no silent NaN, no two runs on one directory, checksummed checkpoints, exact
resumes only, argument validation, early checks, no leaked temporary files, atomic finetuned
checkpoints, and `error: <message>` (exit 2) for user errors. Tiny configs, seconds each."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minimoe as mm
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
        td.run_script(lambda: main(argv))
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
    kept = td.checkpoints(out / "checkpoints")
    assert kept and int(kept[-1].stem[5:]) < bad_step
    for f in kept:  # every checkpoint left is finite and matches its checksum
        td.load_checkpoint(f)
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


def test_a_second_run_on_the_same_out_dir_is_refused(tmp_path, tiny_setup, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live process
    with pytest.raises(SystemExit, match=rf"{out} is in use by another run \(pid {os.getppid()} on "):
        td.main(tiny_args(tiny_setup, out, "--max_steps", "2"))
    assert not (out / "checkpoints").exists()
    (out / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))  # left by a kill -9
    td.main(tiny_args(tiny_setup, out, "--max_steps", "2"))
    assert "which is no longer running" in capsys.readouterr().err
    td.release_lock(out / ".lock")  # what exiting does
    assert not (out / ".lock").exists()

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
    ckpts = td.checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step_0000002.pt", "step_0000003.pt", "step_0000004.pt"]
    assert (out / "checkpoints" / "step_0000004.pt.sha256").read_text().split()[1] == "step_0000004.pt"
    data = bytearray(ckpts[-1].read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)  # random bytes inside: the zip still opens
    ckpts[-1].write_bytes(bytes(data))
    ckpts[-2].write_bytes(ckpts[-2].read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=rf"{ckpts[-1]}: the sha256 checksum does not match"):
        td.load_checkpoint(ckpts[-1])
    with pytest.raises(SystemExit):  # an explicit, damaged file: no fallback
        td.run_script(lambda: td.main(args + ["--resume", str(ckpts[-1])]))
    assert f"error: {ckpts[-1]}: the sha256 checksum does not match" in capsys.readouterr().err

    td.main(args[:-6] + ["--max_steps", "6", "--save_every", "1", "--log_every", "1", "--eval_every", "100", "--resume"])
    err = capsys.readouterr().err
    assert f"{ckpts[-1]}: the sha256 checksum does not match" in err and f"{ckpts[-2]}: " in err
    assert "falling back to the previous checkpoint" in err
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # resumed from step 2
    for c in td.checkpoints(out / "checkpoints"):
        td.load_checkpoint(c)  # the damaged ones were written again


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
    assert [c.name for c in td.checkpoints(out / "checkpoints")] == ["step_0000004.pt"]


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
    td.atomic_save({"a": torch.ones(2)}, path, checksum=True)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        td.atomic_save({"a": torch.zeros(2)}, path, checksum=True)
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
    td.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "heldout_rel": {}}\n'


# ----------------------------------------------------------------------------- 10. user errors: `error: ...`, exit 2


def test_user_errors_print_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    def user():
        raise ValueError("x.tsv:3: something the user can fix")

    with pytest.raises(SystemExit) as e:
        td.run_script(user)
    assert e.value.code == 2 and capsys.readouterr().err == "error: x.tsv:3: something the user can fix\n"
    with pytest.raises(SystemExit) as e:
        td.run_script(lambda: (_ for _ in ()).throw(SystemExit("--out_dir x: not writable")))
    assert e.value.code == 2 and capsys.readouterr().err == "error: --out_dir x: not writable\n"
    with pytest.raises(KeyError):  # a bug: the traceback
        td.run_script(lambda: {}["missing"])
    monkeypatch.setattr(sys, "argv", ["train_distill.py", "--debug"])
    with pytest.raises(ValueError):  # --debug: a traceback for user errors too
        td.run_script(user)


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
