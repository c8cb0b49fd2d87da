"""Compressing a MiniMoE's experts: truncated SVD per expert or a shared mean plus low-rank deltas."""
import pytest
import torch

import eval as ev
import minimoe as mm


def trained_like(E=4, basis_noise=0.05, **kw):
    """A tiny MiniMoE whose experts differ from a common matrix by a small, full-rank amount (as after training)."""
    cfg = mm.BertConfig(**{**dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                                  max_position_embeddings=40, hidden_dropout=0.0, attention_dropout=0.0,
                                  router_noise=0.0, num_experts=E), **kw})
    model = mm.Bert(cfg)
    with torch.no_grad():
        for layer in model.layers:
            for w in (layer.ffn.w1, layer.ffn.w2):
                w.add_(torch.randn_like(w) * basis_noise)
            layer.ffn.b1.normal_(std=0.1), layer.ffn.b2.normal_(std=0.1)
    return model


def batch(B=3, T=10):
    ids = torch.randint(1, 99, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    return ids * mask, mask


@pytest.mark.parametrize("basis", ["per_expert", "shared"])
def test_reconstruction_error_is_the_discarded_energy(basis):
    model = trained_like()
    for rank in (3, 17):
        small = mm.compress_experts(model, rank, basis)
        for mine, theirs in zip(small.layers, model.layers):
            for rebuilt, w in zip(mine.ffn.dense_weights(), (theirs.ffn.w1, theirs.ffn.w2)):
                target = w - w.mean(0) if basis == "shared" else w
                S = torch.linalg.svdvals(target.double())  # (E, k)
                err = ((rebuilt - w).double() ** 2).sum((1, 2))  # (E,) squared Frobenius error per expert
                assert torch.allclose(err, (S[:, rank:] ** 2).sum(-1), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("basis", ["per_expert", "shared"])
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_full_rank_reproduces_the_model_and_low_rank_runs_the_factors(basis, dispatch):
    model = trained_like(dispatch=dispatch).eval()
    ids, mask = batch()
    full = mm.compress_experts(model, 32, basis).eval()  # 32 = min(H, I): nothing discarded
    with torch.no_grad():
        a, b = model(ids, mask), full(ids, mask)
    real = mask.bool()
    assert (a.last_hidden_state - b.last_hidden_state)[real].abs().max() < 1e-4
    assert all((x - y)[real].abs().max() < 1e-4 for x, y in zip(a.qkv, b.qkv))
    # a low-rank student gives the outputs and gradients of its own re-densified twin (the oracle)
    small = mm.compress_experts(model, 5, basis).train()
    dense = mm.Bert(model.config).train()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        for mine, twin in zip(small.layers, dense.layers):
            w1, w2 = mine.ffn.dense_weights()
            twin.ffn.w1.copy_(w1), twin.ffn.w2.copy_(w2)
    out_s, out_d = small(ids, mask), dense(ids, mask)
    assert (out_s.last_hidden_state - out_d.last_hidden_state).abs().max() < 1e-4
    (out_s.last_hidden_state * real[..., None]).sum().backward()
    (out_d.last_hidden_state * real[..., None]).sum().backward()
    for mine, twin in zip(small.layers, dense.layers):
        assert torch.allclose(mine.ffn.router.weight.grad, twin.ffn.router.weight.grad, atol=1e-4)
        assert torch.allclose(mine.ffn.b1.grad, twin.ffn.b1.grad, atol=1e-4)
        # chain rule: dL/dU1 = dL/dW1 · V1^T for the factor U1 of W1 = (mean +) U1 V1
        assert torch.allclose(mine.ffn.u1.grad, twin.ffn.w1.grad @ mine.ffn.v1.detach().transpose(1, 2), atol=1e-4)
    n_small, n_model = (sum(p.numel() for p in m.parameters()) for m in (small, model))
    assert n_small < n_model


def test_compressed_student_saves_loads_and_counts(tmp_path):
    model = trained_like()
    small = mm.compress_experts(model, 6, "shared").eval()
    mm.save_bert(small, tmp_path / "small")
    back = mm.load_bert(tmp_path / "small")
    assert back.config.expert_rank == 6 and back.config.expert_basis == "shared"
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(small(ids, mask).last_hidden_state, back(ids, mask).last_hidden_state)
    assert mm.count_params(back.config)["encoder"] == sum(p.numel() for p in back.parameters())
    assert mm.rank_for_energy(model, 1.0) == 32 and 1 <= mm.rank_for_energy(model, 0.5, "shared") < 32
    with pytest.raises(ValueError, match="rank"):
        mm.compress_experts(model, 0)
    with pytest.raises(ValueError, match="full-rank"):
        mm.compress_experts(small, 3)


def test_svd_report_ranks(tmp_path, capsys):
    model = trained_like(basis_noise=0.0)  # split init: experts share 2/3 of their neurons
    mm.save_bert(model, tmp_path / "m")
    rows = ev.svd_report(tmp_path / "m")
    assert len(rows) == 4 and all(len(r["own90"]) == 4 for r in rows)
    # each expert differs from the mean only in its own I/3 = 16 neurons: the delta has rank <= 16
    assert all(max(r["delta99"]) <= 16 for r in rows) and max(rows[0]["own99"]) > 16
    assert "rank@90%" in capsys.readouterr().out


def test_tradeoff_and_compress_commands(tmp_path):
    import json

    import train_distill as td
    from test_train_distill import tiny_args, write_corpus
    from test_train_distill import WORDS  # noqa: F401 (the corpus vocabulary)
    tok = mm.load_tokenizer(mm.default_teacher())
    torch.manual_seed(0)
    teacher = mm.BertConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
                            initializer_range=0.3)
    mm.save_bert(mm.Bert(teacher), tmp_path / "teacher", tok)
    setup = dict(teacher=str(tmp_path / "teacher"), corpus=str(write_corpus(tmp_path / "c.txt")), cache=str(tmp_path / "cache"))
    td.main(tiny_args(setup, tmp_path / "run", "--max_steps", "2", "--students", "minilm=1,1:layer", "moe4=1,4"))
    student = tmp_path / "run" / "moe4" / "student"
    out = ev.main(["--compress", str(student), "--rank", "8", "--basis", "shared", "--out", str(tmp_path / "small")])
    assert mm.load_bert(out).config.expert_rank == 8
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = ev.main(["--tradeoff", str(student), "--ranks", "4,32", "--basis", "per_expert,shared", "--teacher",
                        setup["teacher"], "--corpus", setup["corpus"], "--reference", str(tmp_path / "run" / "minilm" / "student"),
                        "--out_dir", str(tmp_path / "res"), "--eval_pairs", "16", "--max_seq_length", "32",
                        "--num_relation_heads", "4", "--threads", "1"])
        assert torch.get_num_threads() == 1  # --threads holds in every mode of eval.py
    finally:
        torch.set_num_threads(threads)
    by = {r["student"]: r for r in rows}
    assert set(by) == {"uncompressed", "minilm", "per_expert r4", "per_expert r32", "shared r4", "shared r32"}
    assert by["per_expert r32"]["heldout"] == pytest.approx(by["uncompressed"]["heldout"], abs=1e-4)  # full rank
    assert by["per_expert r4"]["params"] < by["shared r4"]["params"] < by["uncompressed"]["params"]
    res = json.loads((tmp_path / "res" / "tradeoff.json").read_text())
    assert res["rows"] == rows and (tmp_path / "res" / "tradeoff.png").exists()
