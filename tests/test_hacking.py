"""The README's "where to change what" table, tested by use: each row's change, made where the row says,
takes effect in the model or the run. A row that points at the wrong place fails here."""
import json

import torch
import torch.nn.functional as F

import minimoe as mm
import train_distill as td
from test_train_distill import read_log, tiny_args, tiny_setup, tokenizer  # noqa: F401 (fixtures)


def top2_route_and_run(ffn, x, token_mask, run_experts):
    """route_and_run with top-2 routing: each token runs its two likeliest experts, outputs weighted by
    their router probabilities."""
    shape, H = x.shape, x.shape[-1]
    x = x.reshape(-1, H)  # (N, H)
    probs = ffn.router(x).float().softmax(-1)  # (N, E)
    gates, experts = probs.topk(2, dim=-1)  # (N, 2), (N, 2)
    y = 0
    for k in range(2):
        groups = mm.group_tokens(experts[:, k], probs.shape[-1])
        ys = run_experts(x.index_select(0, groups.order), groups)  # (N, H), sorted by expert
        y = y + mm.unsort(ys, groups) * gates[:, k, None]
    mask = torch.ones(x.shape[0]) if token_mask is None else token_mask.reshape(-1)
    return y.view(shape), mm.load_balance(probs, experts[:, 0], mask)


def test_top2_routing_is_an_edit_of_route_and_run(monkeypatch):
    cfg = mm.BertConfig(hidden_size=16, num_heads=2, intermediate_size=32, num_experts=4, router_noise=0.0)
    ffn = mm.MoEFeedForward(cfg)
    ffn.split_init_(0.5)
    x = torch.randn(2, 5, 16)  # (B, T, H)
    top1, _ = ffn(x)
    monkeypatch.setattr(mm, "route_and_run", top2_route_and_run)
    y, aux = ffn(x)

    xs = x.reshape(-1, 16)  # the oracle: sum over each token's two experts, no dispatch at all
    gates, experts = ffn.router(xs).softmax(-1).topk(2, dim=-1)
    every = torch.stack([F.gelu(xs @ ffn.w1[e] + ffn.b1[e]) @ ffn.w2[e] + ffn.b2[e] for e in range(4)], 1)
    want = (every.gather(1, experts[..., None].expand(-1, -1, 16)) * gates[..., None]).sum(1)  # (N, H)
    torch.testing.assert_close(y.reshape(-1, 16), want)
    assert not torch.allclose(y, top1)
    (y.sum() + aux.loss).backward()  # trainable: the router gets gradients through both gates
    assert ffn.router.weight.grad.abs().sum() > 0


def test_another_loss_term_is_an_edit_of_distill_loss(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    plain = td.distill_loss

    def with_term(teacher_qkv, student, batch, *args, **kwargs):
        loss, rel, lb, out = plain(teacher_qkv, student, batch, *args, **kwargs)
        return loss + 0.5, rel, lb, out  # a new term: here a constant, to see it in the log

    monkeypatch.setattr(td, "distill_loss", with_term)
    td.main(tiny_args(tiny_setup, tmp_path / "run", "--max_steps", "2", "--log_every", "1"))
    rows = [r for r in read_log(tmp_path / "run") if "loss" in r]  # the training records
    assert len(rows) == 2
    for row in rows:
        assert abs(row["loss"] - row["rel"] - 0.01 * row["lb"] - 0.5) < 1e-5


def test_another_teacher_layer_is_a_flag(tiny_setup, tmp_path):  # noqa: F811
    for layer in ("-1", "0"):
        td.main(tiny_args(tiny_setup, tmp_path / layer, "--max_steps", "1", "--teacher_layer", layer))
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("-1", "0")]
    assert [r["args"]["teacher_layer"] for r in results] == [-1, 0]
    assert read_log(tmp_path / "-1")[0]["rel"] != read_log(tmp_path / "0")[0]["rel"]  # other relations


PLAIN_READERS, JSONL_READ = td.iter_documents, []


def jsonl_documents(sources, min_words=8):
    """iter_documents with one more format: a .jsonl file of {"text": ...} documents. Module-level, as the
    datasets cache hashes the generator (a closure over test state would not pickle)."""
    for src in sources:
        if not src.endswith(".jsonl"):
            yield from PLAIN_READERS([src], min_words)
            continue
        JSONL_READ.append(src)
        for line in open(src):
            yield {"sentences": td.split_sentences(json.loads(line)["text"], min_words)}


def test_a_new_corpus_format_is_an_edit_of_iter_documents(tiny_setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    corpus = tmp_path / "corpus.jsonl"  # a format the readers do not know: one JSON document per line
    docs = [" ".join(f"Word{d} number {i} of the document in this small test corpus." for i in range(6))
            for d in range(40)]
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    JSONL_READ.clear()
    monkeypatch.setattr(td, "iter_documents", jsonl_documents)
    args = tiny_args(tiny_setup, tmp_path / "run", "--prepare_only", "--num_proc", "1")
    args[args.index("--corpus") + 1], args[args.index("--cache_dir") + 1] = str(corpus), str(tmp_path / "cache")
    td.main(args)
    assert JSONL_READ == [str(corpus)]
    assert f"pairs from {corpus}" in capsys.readouterr().out


def test_a_new_student_size_is_a_preset(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(mm.PRESETS, "2L-48H", dict(num_layers=2, hidden_size=48, num_heads=3,
                                                   intermediate_size=192))
    args = tiny_args(tiny_setup, tmp_path / "run", "--max_steps", "1", "--student", "2L-48H")
    for flag in ("--layers", "--hidden", "--heads"):  # let the preset decide the size
        i = args.index(flag)
        del args[i:i + 2]
    td.main(args)
    cfg = mm.load_bert(tmp_path / "run" / "student").config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (2, 48, 3, 192)


def test_another_expert_init_is_an_edit_of_split_init(monkeypatch):
    def ones_init_(self, std):
        for p in (self.w1, self.w2):
            p.fill_(std)

    monkeypatch.setattr(mm.MoEFeedForward, "split_init_", torch.no_grad()(ones_init_))
    model = mm.Bert(mm.BertConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, num_experts=2))
    ffn = model.layers[0].ffn
    std = model.config.initializer_range
    assert torch.all(ffn.w1 == std) and torch.all(ffn.w2 == std)
