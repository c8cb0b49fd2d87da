"""finetune.py end to end on tiny random encoders (2 layers, hidden 32): the loss goes down, the
best checkpoint is kept and reloads in eval.py with the same dev metrics, early stopping, the lr grid,
regression and NER heads, the pretrained pooler, and the compute report."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import finetune as ft
import minimoe


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and does not fight other processes for 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    try:
        return minimoe.load_tokenizer(minimoe.default_teacher())
    except ImportError as e:
        pytest.skip(str(e))


def tiny_config(**kw):
    return minimoe.BertConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, **kw)


@pytest.fixture(scope="module", params=[1, 4], ids=["dense", "moe4"])
def tiny_dir(request, tmp_path_factory, tok):
    """A random tiny encoder saved like a distilled student (save_bert + tokenizer)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(f"tiny{request.param}")
    minimoe.save_bert(minimoe.Bert(tiny_config(num_experts=request.param)), d, tokenizer=tok)
    return d


POS = ["a good film", "good and fun", "really good acting", "so good", "good story , good cast", "a good time"]
NEG = ["a bad film", "bad and dull", "really bad acting", "so bad", "bad story , bad cast", "a bad time"]


def sst2_files(root, n_train=48, n_dev=12):
    rows = [(s, 1) for s in POS] + [(s, 0) for s in NEG]
    lines = lambda n: ["sentence\tlabel"] + [f"{rows[i % len(rows)][0]} {i}\t{rows[i % len(rows)][1]}" for i in range(n)]  # noqa: E731
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.tsv").write_text("\n".join(lines(n_train)) + "\n")
    (root / "dev.tsv").write_text("\n".join(lines(n_dev)) + "\n")
    return root


def read_log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss(tiny_dir, tok):
    """A few AdamW steps on a fixed batch lower the task loss; the MoE aux loss is on and positive."""
    task = ft.get_task("sst2")
    torch.manual_seed(0)
    model = ft.build_model(task, tiny_dir)
    ex = [ft.Example(s, None, 1) for s in POS] + [ft.Example(s, None, 0) for s in NEG]
    batch = ft.collate_features(ft.encode(task, ex, tok, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits, loss, aux = model(**batch)
        (loss + 0.01 * aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert logits.shape == (len(ex), 2)
    assert losses[-1] < 0.5 * losses[0], losses
    if model.bert.config.num_experts > 1:
        assert aux.item() > 0
    else:
        assert aux.item() == 0


def test_main_keeps_best_checkpoint_and_eval_reloads_it(tiny_dir, tmp_path, capsys):
    data = sst2_files(tmp_path / "SST-2")
    out = tmp_path / "runs" / "sst2"
    best = ft.main(["--task", "sst2", "--model", str(tiny_dir), "--data_dir", str(data), "--out_dir", str(out),
                    "--lr", "1e-3,3e-3", "--epochs", "8", "--batch_size", "8", "--eval_every", "6", "--log_every", "6",
                    "--patience", "0", "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert "48 steps per lr, dev evaluation every 6 steps\n" in printed
    assert printed.rstrip().splitlines()[-1].endswith(f"to {out}")  # where the kept checkpoint is, last
    log = read_log(out)
    train = [r["loss"] for r in log if r["event"] == "train" and r["lr"] == 3e-3]
    assert train[-1] < train[0], train  # finetuning lowers the loss
    summary = [r for r in log if r["event"] == "summary"][0]
    assert set(summary["grid"]) == {"0.001", "0.003"}
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["task"] == "sst2" and meta["labels"] == ["0", "1"] and set(meta["grid"]) == {"0.001", "0.003"}
    assert meta["metrics"]["acc"] == pytest.approx(best["score"]) == pytest.approx(summary["best_score"])
    assert meta["lr"] == best["lr"]
    evals = [r["dev"]["acc"] for r in log if r["event"] == "eval"]
    assert max(evals) == pytest.approx(best["score"])
    # the kept checkpoint: an encoder minimoe reads, plus the head; eval.py reproduces its dev metrics
    assert minimoe.load_bert(out).config.num_experts == minimoe.load_bert(tiny_dir).config.num_experts
    metrics, _ = ev.evaluate_checkpoint(out, file=str(data / "dev.tsv"))
    assert metrics["acc"] == pytest.approx(meta["metrics"]["acc"])
    rep = ev.main(["--ckpt", str(out), "--file", str(data / "dev.tsv"), "--json", str(tmp_path / "r.json")])
    assert rep["metrics"]["acc"] == pytest.approx(meta["metrics"]["acc"])
    results = ev.main(["--tasks", "all", "--runs", str(tmp_path / "runs"), "--cached", "--json", str(tmp_path / "t.json")])
    row = results[str(tmp_path / "runs")]["row"]
    assert row["SST-2"] == pytest.approx(100 * meta["metrics"]["acc"]) and row["Avg"] == pytest.approx(row["SST-2"])
    assert "| runs |" in json.loads((tmp_path / "t.json").read_text())["markdown"]



def test_data_from_minimoe_data_and_eval_reads_where_the_run_read(tiny_dir, tmp_path, monkeypatch):
    """One data setting: $MINIMOE_DATA (the README's layout) is --data_dir's default; eval.py --ckpt then
    reads the data where the run read it, with the variable gone."""
    root = tmp_path / "data"
    sst2_files(root / "glue" / "SST-2")
    monkeypatch.setenv("MINIMOE_DATA", str(root))
    out = tmp_path / "run"
    ft.main(["--task", "sst2", "--model", str(tiny_dir), "--out_dir", str(out), "--lr", "3e-3", "--epochs", "1",
             "--batch_size", "8", "--precision", "fp32"])
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["args"]["data_dir"] == str(root)
    monkeypatch.delenv("MINIMOE_DATA")
    rep = ev.main(["--ckpt", str(out)])
    assert rep["metrics"]["acc"] == pytest.approx(meta["metrics"]["acc"])

def test_eval_schedule_says_when_dev_evaluation_happens():
    assert ft.eval_schedule(78, 60) == "dev evaluation at the last step (60)"
    assert ft.eval_schedule(78, 78, per_epoch=True) == "dev evaluation at the last step (78)"
    assert ft.eval_schedule(10, 60) == "dev evaluation every 10 steps"
    assert ft.eval_schedule(78, 200, per_epoch=True) == "dev evaluation every 78 steps (each epoch) and at the last (200)"


def test_early_stopping(tiny_dir, tmp_path):
    data = sst2_files(tmp_path / "SST-2")
    out = tmp_path / "es"
    ft.main(["--task", "sst2", "--model", str(tiny_dir), "--data_dir", str(data), "--out_dir", str(out), "--lr", "0",
             "--epochs", "20", "--batch_size", "8", "--eval_every", "2", "--patience", "2", "--no_save"])
    evals = [r for r in read_log(out) if r["event"] == "eval"]
    assert len(evals) == 3  # lr 0: the first evaluation is never beaten, stop after 2 more
    assert not (out / "finetune.json").exists()


def test_regression_head(tiny_dir, tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [f"{i}\tg\tf\t2012\t{i}\tn\tn\ta man {'runs' if i % 2 else 'sits'}\ta man runs\t{5.0 * (i % 2):.3f}" for i in range(24)]
    d = tmp_path / "STS-B"
    d.mkdir()
    for split in ("train", "dev"):
        (d / f"{split}.tsv").write_text("\n".join([head] + rows) + "\n")
    out = tmp_path / "stsb"
    best = ft.main(["--task", "stsb", "--model", str(tiny_dir), "--data_dir", str(d), "--out_dir", str(out),
                    "--lr", "3e-3", "--epochs", "6", "--batch_size", "8"])
    assert set(best["metrics"]) == {"pearson", "spearman", "corr"}
    assert best["metrics"]["pearson"] > 0.5
    model, tok, meta = ft.load_finetuned(out)
    assert meta["num_labels"] == 1 and model.classifier.out_features == 1
    preds = ft.predict(model, ft.encode(ft.get_task("stsb"), [ft.Example("a man runs", "a man runs", 5.0)], tok))
    assert isinstance(preds[0], float)


def test_ner_head(tiny_dir, tmp_path):
    sents = [[("Peter", "I-PER"), ("lives", "O"), ("in", "O"), ("Paris", "I-LOC"), (".", "O")],
             [("Acme", "I-ORG"), ("Corporation", "I-ORG"), ("hired", "O"), ("Anna", "I-PER")]] * 8
    text = "-DOCSTART- -X- -X- O\n\n" + "\n\n".join("\n".join(f"{w} NN O {t}" for w, t in s) for s in sents) + "\n"
    d = tmp_path / "conll2003"
    d.mkdir()
    for split in ("train", "dev"):
        (d / f"{split}.txt").write_text(text)
    out = tmp_path / "ner"
    best = ft.main(["--task", "conll", "--model", str(tiny_dir), "--data_dir", str(tmp_path), "--out_dir", str(out),
                    "--lr", "5e-3", "--epochs", "8", "--batch_size", "4"])
    assert set(best["metrics"]) == {"precision", "recall", "f1"}
    assert best["metrics"]["f1"] > 0.5
    metrics, meta = ev.evaluate_checkpoint(out, data_dir=str(tmp_path))
    assert metrics["f1"] == pytest.approx(meta["metrics"]["f1"])
    model, _, _ = ft.load_finetuned(out)
    assert model.pooler is None and model.classifier.out_features == len(ft.CONLL_TAGS)


def test_pretrained_pooler_is_used():
    teacher = Path(minimoe.default_teacher())
    from safetensors import safe_open
    with safe_open(str(teacher / "model.safetensors"), "pt") as f:
        w = f.get_tensor("pooler.dense.weight")
    model = ft.build_model(ft.get_task("rte"), teacher)
    assert torch.equal(model.pooler.weight.data, w.float())
    assert model.training
    fresh = ft.build_model(ft.get_task("rte"), teacher, init_pooler=False)
    assert not torch.equal(fresh.pooler.weight.data, w.float())


def test_compute_report(tiny_dir):
    bert = minimoe.load_bert(tiny_dir)
    rep = ev.compute_report(bert, batch_size=4, seq_len=16, iters=2, warmup=1, device=torch.device("cpu"))
    p = minimoe.count_params(bert.config)
    assert rep["params_total"] == p["total"] and rep["params_active"] == p["active"]
    if bert.config.num_experts > 1:
        assert rep["params_total"] > rep["params_active"]
    assert rep["flops_per_token_at_128"] == minimoe.count_flops(bert.config, 128)["flops_per_token"]
    assert rep["latency_ms"] > 0 and rep["throughput_seq_s"] > 0 and rep["peak_memory_mb"] > 10
    assert rep["peak_memory_kind"] == "cpu_max_rss"
    cli = ev.main(["--compute", "--ckpt", str(tiny_dir), "--compute_batch", "2", "--seq_len", "8", "--iters", "1"])
    assert cli["params_total"] == p["total"] and cli["seq_len"] == 8


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_predictions(tiny_dir, tok, tmp_path, pooling):
    """Dynamic padding is safe: an example gives the same logits alone and padded in a batch; the
    pooling mode survives save/load."""
    task = ft.get_task("rte")
    torch.manual_seed(0)
    model = ft.build_model(task, tiny_dir, pooling=pooling).eval()
    ex = [ft.Example("A short premise.", "Short.", 0), ft.Example("A much longer premise " * 6, "and a hypothesis.", 1)]
    f = ft.encode(task, ex, tok, 64)
    with torch.no_grad():
        alone = model(**{k: v for k, v in ft.collate_features(f[:1]).items() if k != "labels"})[0]
        batched = model(**{k: v for k, v in ft.collate_features(f).items() if k != "labels"})[0]
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)
    ft.save_finetuned(model, tmp_path, tok, dict(task="rte", num_labels=2, pooling=pooling, metrics={}))
    loaded, _, _ = ft.load_finetuned(tmp_path)
    assert loaded.pooling == pooling
    assert ft.predict(loaded, f) == ft.predict(model, f)


def test_head_matches_transformers(tmp_path, tok):
    """Our encoder + pooler + classifier give the logits of transformers.BertForSequenceClassification
    holding the same weights (a dense checkpoint written by save_bert loads there)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    minimoe.save_bert(minimoe.Bert(tiny_config()), tmp_path, tokenizer=tok)
    task = ft.get_task("mnli")
    ours = ft.build_model(task, tmp_path).eval()
    hf = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3).eval()
    with torch.no_grad():
        hf.bert.pooler.dense.weight.copy_(ours.pooler.weight)
        hf.bert.pooler.dense.bias.copy_(ours.pooler.bias)
        hf.classifier.weight.copy_(ours.classifier.weight)
        hf.classifier.bias.copy_(ours.classifier.bias)
    f = ft.encode(task, [ft.Example("The cat sat on the mat.", "A cat sat.", 0), ft.Example("No.", "Yes, it is.", 1)], tok)
    b = ft.collate_features(f)
    with torch.no_grad():
        logits = ours(b["input_ids"], b["attention_mask"], b["token_type_ids"])[0]
        ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)


def test_ddp_two_cpu_processes(tok, tmp_path):
    """torchrun with 2 gloo processes and a MiniMoE encoder: batches are sharded, the master evaluates
    and saves, and every rank follows its early-stopping decision (no hang)."""
    import os
    import socket
    import subprocess
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tiny_dir = minimoe.save_bert(minimoe.Bert(tiny_config(num_experts=4)), tmp_path / "tiny", tokenizer=tok)
    data = sst2_files(tmp_path / "SST-2")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(ft.__file__)), "--task", "sst2", "--model", str(tiny_dir), "--data_dir", str(data), "--out_dir",
           str(out), "--lr", "0", "--epochs", "20", "--batch_size", "8", "--eval_every", "3", "--patience", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(out)
    assert [x["step"] for x in log if x["event"] == "eval"] == [3, 6, 9]  # 48 rows / (8 x 2 ranks) = 3 steps per epoch
    assert (out / "finetune.json").exists()


# ----------------------------------------------------------------------------- protocols, seeds, plans


def test_protocol_presets_and_explicit_flags_win():
    a = ft.parse_args(["--task", "rte", "--protocol", "authors"])
    assert (a.batch_size, a.grad_clip, a.eval_every, a.patience, a.patience_unit, a.lrs) == (16, 5.0, 10, 5, "epochs", [3e-5])
    b = ft.parse_args(["--task", "rte", "--protocol", "authors", "--batch_size", "8", "--grad_clip", "1"])
    assert (b.batch_size, b.grad_clip, b.eval_every) == (8, 1.0, 10)
    c = ft.parse_args(["--task", "conll", "--protocol", "authors"])
    assert (c.lrs, c.batch_size, c.epochs, c.eval_every) == ([2e-5], 32, 3, 100)
    d = ft.parse_args(["--task", "rte"])
    assert (d.batch_size, d.grad_clip, d.eval_every, d.patience, d.patience_unit) == (32, 1.0, 0, 3, "evals")


def test_eval_every_steps_last_scores_and_patience_in_epochs(tiny_dir, tmp_path):
    data = sst2_files(tmp_path / "SST-2")  # 48 examples, batch 8: 6 steps an epoch
    out = tmp_path / "p"
    ft.main(["--task", "sst2", "--model", str(tiny_dir), "--data_dir", str(data), "--out_dir", str(out), "--lr", "0",
             "--epochs", "20", "--batch_size", "8", "--eval_every", "4", "--patience", "2", "--patience_unit", "epochs"])
    evals = [r for r in read_log(out) if r["event"] == "eval"]
    # lr 0: the step-4 evaluation is the best forever; stop at the first evaluation >= 2 epochs (12 steps) later
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["step"] == 4 and meta["last_metrics"] == evals[-1]["dev"]
    assert meta["best_by_metric"]["acc"] == [evals[0]["dev"]["acc"], 4]


def test_seeds_and_their_mean_and_std(tiny_dir, tmp_path):
    data = sst2_files(tmp_path / "SST-2")
    root = tmp_path / "runs"
    common = ["--task", "sst2", "--model", str(tiny_dir), "--data_dir", str(data), "--lr", "3e-3", "--epochs", "2",
              "--batch_size", "8", "--eval_every", "3", "--patience", "0", "--log_every", "3"]
    runs = ft.main(common + ["--out_dir", str(root / "sst2"), "--seeds", "1,2,3"])
    assert set(runs) == {1, 2, 3} and all((root / "sst2" / f"seed{s}" / "finetune.json").exists() for s in (1, 2, 3))
    scores = [json.loads((root / "sst2" / f"seed{s}" / "log.jsonl").read_text().splitlines()[-1])["best_score"]
              for s in (1, 2, 3)]
    losses = {s: [r["loss"] for r in read_log(root / "sst2" / f"seed{s}") if r["event"] == "train"] for s in (1, 2, 3)}
    assert losses[1] != losses[2] != losses[3]  # seeds change the head init and the data order
    res = ev.main(["--tasks", "sst2", "--runs", str(root), "--cached", "--json", str(tmp_path / "t.json")])[str(root)]
    import statistics
    assert res["row"]["SST-2"] == pytest.approx(100 * statistics.fmean(scores))
    assert res["row"]["SST-2±"] == pytest.approx(100 * statistics.stdev(scores))
    assert len(res["runs"]["sst2"]) == 3
    assert [r["acc"] for r in res["scores"]["sst2"]] == pytest.approx(scores)  # each seed's own score, for the plot
    # "± std" marks a mean over seeds, even when the seeds agree exactly; one run has none
    assert "| a | 50.0 ± 0.0 |" in ev.markdown_table({"a": ev.glue_row({"rte": {"acc": .5}}, {"rte": {"acc": 0.0}})},
                                                      {"rte"})
    one = ev.main(["--tasks", "sst2", "--runs", str(root / "sst2" / "seed1"), "--cached"])
    assert "SST-2±" not in one[str(root / "sst2" / "seed1")]["row"]
    png = tmp_path / "t.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plan_runs_models_tasks_seeds_and_skips_finished(tiny_dir, tmp_path, monkeypatch):
    data = sst2_files(tmp_path / "SST-2")
    plan = dict(models={"a": str(tiny_dir), "b": str(tiny_dir)}, tasks=["sst2"], seeds=[1, 2], out_dir=str(tmp_path / "d"),
                args=["--data_dir", str(data), "--epochs", "1", "--batch_size", "8", "--lr", "1e-3"])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    calls = []
    real = ft.finetune
    held = []  # whether the run's lock is still held when its finetune returns (until done.json is written)

    def spy(args, **kw):
        calls.append((args.model, args.seed))
        best = real(args, **kw)
        held.append((Path(args.out_dir) / ".lock").exists())
        return best
    monkeypatch.setattr(ft, "finetune", spy)
    ft.main(["--plan", str(tmp_path / "plan.json")])
    assert len(calls) == 4 and all((tmp_path / "d" / m / "sst2" / f"seed{s}" / "done.json").exists()
                                   for m in "ab" for s in (1, 2))
    assert held == [True] * 4 and not list((tmp_path / "d").rglob(".lock"))  # released after done.json
    (tmp_path / "d" / "b" / "sst2" / "seed2" / "done.json").unlink()  # as if cut off during this run
    ft.main(["--plan", str(tmp_path / "plan.json")])
    assert len(calls) == 5 and calls[-1][1] == 2
    table = ev.main(["--tasks", "all", "--runs", str(tmp_path / "d" / "a"), str(tmp_path / "d" / "b"), "--cached",
                     "--json", str(tmp_path / "g.json")])
    assert "Avg: mean over SST-2" in json.loads((tmp_path / "g.json").read_text())["markdown"]
    md = (tmp_path / "g.md").read_text()  # best and last evaluations, with the command that wrote them
    assert md.startswith("<!-- generated by: python eval.py --tasks all") and md.count("| model | SST-2 (Acc)") == 2
    assert all(len(r["runs"]["sst2"]) == 2 for r in table.values())


def test_plan_workers_skip_runs_another_live_process_holds(tiny_dir, tmp_path, monkeypatch):
    """Two processes may share a plan: a run whose lock a live process holds is left to it, untouched."""
    from tests.test_reliability import hold_lock
    data = sst2_files(tmp_path / "SST-2")
    plan = dict(models={"a": str(tiny_dir)}, tasks=["sst2"], seeds=[1, 2], out_dir=str(tmp_path / "d"),
                args=["--data_dir", str(data), "--epochs", "1", "--batch_size", "8", "--lr", "1e-3"])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    busy = tmp_path / "d" / "a" / "sst2" / "seed1"
    other = hold_lock(busy)  # the other worker
    try:
        (busy / "log.jsonl").write_text("its partial log\n")
        calls = []
        real = ft.finetune
        monkeypatch.setattr(ft, "finetune", lambda args, **kw: (calls.append(args.seed), real(args, **kw))[1])
        ft.main(["--plan", str(tmp_path / "plan.json")])
        assert calls == [2] and (tmp_path / "d" / "a" / "sst2" / "seed2" / "done.json").exists()
        assert not (tmp_path / "d" / "a" / "sst2" / "seed2" / ".lock").exists()  # released after its run
        assert (busy / "log.jsonl").read_text() == "its partial log\n" and not (busy / "done.json").exists()
        # the table leaves out a run in progress (its finetune.json is only its best so far)
        seed2 = tmp_path / "d" / "a" / "sst2" / "seed2"
        shutil.copy(seed2 / "finetune.json", busy / "finetune.json")
        assert ev.find_runs(tmp_path / "d" / "a", ["sst2"]) == {"sst2": [seed2]}
    finally:
        other.kill()
        other.wait()
    ft.main(["--plan", str(tmp_path / "plan.json")])  # the other worker died: its run is started again
    assert calls == [2, 1] and (busy / "done.json").exists()
    assert ev.find_runs(tmp_path / "d" / "a", ["sst2"]) == {"sst2": [busy, seed2]}


def test_a_run_that_fails_before_training_leaves_no_directory(tiny_dir, tmp_path):
    """No data for the task: an error, and no empty runs/finetune/TASK, nor parents it made, left behind (a
    folder that was there before stays, and so does a parent another run uses)."""
    (tmp_path / "nodata").mkdir()
    out = tmp_path / "runs" / "finetune" / "rte"
    with pytest.raises(FileNotFoundError, match="no train file for rte"):
        ft.main(["--task", "rte", "--model", str(tiny_dir), "--data_dir", str(tmp_path / "nodata"), "--out_dir",
                 str(out)])
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "finetune" / "mrpc").mkdir(parents=True)  # another run's
    with pytest.raises(FileNotFoundError):
        ft.main(["--task", "rte", "--model", str(tiny_dir), "--data_dir", str(tmp_path / "nodata"), "--out_dir",
                 str(out)])
    assert not out.exists() and (tmp_path / "runs" / "finetune" / "mrpc").is_dir()
    out.mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        ft.main(["--task", "rte", "--model", str(tiny_dir), "--data_dir", str(tmp_path / "nodata"), "--out_dir",
                 str(out)])
    assert out.is_dir()


def test_a_plan_run_that_fails_before_training_leaves_no_directory(tiny_dir, tmp_path, monkeypatch):
    """The same for a --plan run (which locks its directory before finetune starts); its model given as
    ~/NAME is found, as --model finds it."""
    (tmp_path / "nodata").mkdir()
    monkeypatch.setenv("HOME", str(tiny_dir.parent))
    plan = dict(models={"m": f"~/{tiny_dir.name}"}, tasks=["rte"], out_dir=str(tmp_path / "plans" / "a"),
                args=["--data_dir", str(tmp_path / "nodata")])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(FileNotFoundError, match="no train file for rte"):
        ft.main(["--plan", str(tmp_path / "plan.json")])
    assert not (tmp_path / "plans").exists()
