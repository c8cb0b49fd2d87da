"""The original MiniMoE (GeneZC/MiniMoE) as we reproduce it: the extra relation head, the split expert
init, the authors' checkpoint layout, and the original's relation dropout."""
import json

import pytest
import torch
import torch.nn.functional as F

import minimoe as mm


def tiny(**kw):
    return mm.BertConfig(**{**dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                                   max_position_embeddings=40, hidden_dropout=0.0, attention_dropout=0.0,
                                   router_noise=0.0), **kw})


def batch(B=6, T=24, vocab=99):
    ids = torch.randint(1, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T * 2 // 3:], mask[B - 1, T // 4:] = 0, 0
    return ids * mask, mask


def relation_grads(cfg, seed=0):
    """Gradients of the relation loss alone (against a random teacher) w.r.t. every student parameter."""
    torch.manual_seed(seed)
    student = mm.Bert(cfg).train()
    ids, mask = batch()
    teacher_qkv = tuple(torch.randn(*ids.shape, 64) for _ in range(3))
    out = student(ids, mask)
    assert (out.router_stats > 0).all() if cfg.num_experts > 1 else True  # every expert saw tokens
    mm.relation_loss(teacher_qkv, out.qkv, mask, num_relation_heads=4).backward()
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in student.named_parameters()}


def test_relation_head_auto_extra_for_experts_layer_for_dense():
    assert tiny(num_experts=4).relation_head == "extra"
    assert tiny().relation_head == "layer"
    assert tiny(num_experts=4, relation_head="layer").relation_head == "layer"
    assert mm.Bert(tiny()).relation_proj is None
    with pytest.raises(ValueError, match="relation_head"):
        tiny(relation_head="last")
    with pytest.raises(ValueError, match="expert_init"):
        tiny(expert_init="copy")


def test_extra_head_trains_every_parameter_of_a_moe_student():
    grads = relation_grads(tiny(num_experts=2))
    assert all(grads.values()), [n for n, g in grads.items() if not g]
    assert any(n.startswith("layers.1.ffn.w1") for n in grads)


def test_layer_head_leaves_the_last_ffn_untrained_as_the_original_minilm():
    grads = relation_grads(tiny())
    last = [n for n in grads if n.startswith(("layers.1.ffn.", "layers.1.ln2.", "layers.1.ln1.", "layers.1.attn.o."))]
    assert last and not any(grads[n] for n in last)
    assert all(g for n, g in grads.items() if n not in last)
    moe_layer = relation_grads(tiny(num_experts=2, relation_head="layer"))  # ours before the fix: a third untrained
    assert not any(g for n, g in moe_layer.items() if n.startswith("layers.1.ffn."))


def test_extra_head_on_a_dense_student_trains_its_last_ffn():
    grads = relation_grads(tiny(relation_head="extra"))
    assert all(grads.values()), [n for n, g in grads.items() if not g]


def test_split_init_shares_two_thirds_of_each_experts_neurons():
    E, I = 4, 48
    ffn = mm.Bert(tiny(num_experts=E, intermediate_size=I)).layers[0].ffn
    S = 2 * I // 3
    w1, w2 = ffn.w1.detach(), ffn.w2.detach()  # (E, H, I), (E, I, H)
    for a in range(E):
        for b in range(a + 1, E):
            assert torch.equal(w1[a][:, :S], w1[b][:, :S]) and torch.equal(w2[a][:S], w2[b][:S])
            own_a, own_b = w1[a][:, S:].T, w1[b][:, S:].T  # (I - S, H) neurons of each
            assert not (own_a[:, None, :] == own_b[None, :, :]).all(-1).any()  # no own neuron is shared
    idx = mm.split_neurons(E, I)
    assert idx.shape == (E, I) and (idx[:, :S] == torch.arange(S)).all()
    assert idx[1, S:].tolist() == list(range(S + 1, E * I, E))[:I - S]
    assert len(set(idx[:, S:].flatten().tolist())) == E * (I - S)
    # the router keeps PyTorch's default init (uniform within 1/sqrt(H)), not the normal(0.02) of the rest
    assert ffn.router.weight.abs().max() <= 32 ** -0.5 and ffn.router.weight.std() > 0.05
    ind = mm.Bert(tiny(num_experts=E, intermediate_size=I, expert_init="independent")).layers[0].ffn
    assert not torch.equal(ind.w1[0][:, :S], ind.w1[1][:, :S])


def authors_checkpoint(d, E=4, H=32, I=48, L=2, vocab=99, fmt="safetensors"):
    """A random checkpoint in the layout of the authors' MoEBertMiniLM.save_pretrained."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"bert.embeddings.word_embeddings.weight": r(vocab, H), "bert.embeddings.position_embeddings.weight": r(40, H),
          "bert.embeddings.token_type_embeddings.weight": r(2, H),
          "bert.embeddings.LayerNorm.weight": 1 + r(H), "bert.embeddings.LayerNorm.bias": r(H),
          "bert.pooler.dense.weight": r(H, H), "bert.pooler.dense.bias": r(H)}
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = r(H, H), r(H)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(H), r(H)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(E, I, H), r(E, I)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(E, H, I), r(E, H)
        sd[p + "ffn_gate.weight"], sd[p + "ffn_gate.bias"] = r(E, H) * 5, r(E)
        sd[p + "attn_gate.weight"], sd[p + "attn_gate.bias"] = r(1, H), r(1)
    for n in ("query", "key", "value"):
        sd[f"self.{n}.weight"], sd[f"self.{n}.bias"] = r(H, H), r(H)
    cfg = dict(architectures=["MoEBertMiniLM"], model_type="bert", moe=f"1,{E}", vocab_size=vocab, hidden_size=H,
               num_hidden_layers=L, num_attention_heads=4, intermediate_size=E * I, hidden_act="gelu",
               max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12, num_relation_heads=4,
               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(d / "model.safetensors"))
    else:
        torch.save(sd, d / "pytorch_model.bin")
    return sd


def authors_forward(sd, ids, mask, L=2, nh=4, eps=1e-12):
    """The original's eval-mode forward, per token, in float64: BERT attention; the FFN routes each
    token to argmax softmax(ffn_gate(x)) and scales that expert's output by its probability."""
    sd = {k: v.double() for k, v in sd.items()}
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)  # noqa: E731
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    B, T = ids.shape
    x = sd["bert.embeddings.word_embeddings.weight"][ids] + sd["bert.embeddings.position_embeddings.weight"][:T] \
        + sd["bert.embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)]
    x = ln(x, "bert.embeddings.LayerNorm")
    H = x.shape[-1]
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").view(B, T, nh, H // nh).transpose(1, 2) for n in ("query", "key", "value"))
        att = q @ k.transpose(-1, -2) / (H // nh) ** 0.5 + (1 - mask[:, None, None, :].double()) * -10000.0
        ctx = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        y = torch.zeros_like(x)
        for b in range(B):
            for t in range(T):
                probs = lin(x[b, t], p + "ffn_gate").softmax(-1)
                e = int(probs.argmax())
                h = F.gelu(x[b, t] @ sd[p + "intermediate.dense.weight"][e].T + sd[p + "intermediate.dense.bias"][e])
                y[b, t] = probs[e] * (h @ sd[p + "output.dense.weight"][e].T + sd[p + "output.dense.bias"][e])
        x = ln(x + y, p + "output.LayerNorm")
    return x, tuple(lin(x, f"self.{n}") for n in ("query", "key", "value"))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_authors_minimoe_checkpoint_loads_and_matches_their_forward(tmp_path, fmt):
    sd = authors_checkpoint(tmp_path / "ckpt", fmt=fmt)
    model = mm.load_bert(tmp_path / "ckpt")
    assert model.config.num_experts == 4 and model.config.intermediate_size == 48
    assert model.config.relation_head == "extra"
    ids, mask = batch(B=3, T=9)
    ref, ref_qkv = authors_forward(sd, ids, mask)
    with torch.no_grad():
        out = model.double()(ids, mask)
    real = mask.bool()
    assert (out.last_hidden_state - ref)[real].abs().max() < 1e-6
    for ours, theirs in zip(out.qkv, ref_qkv):  # their extra relation head is ours
        assert (ours - theirs)[real].abs().max() < 1e-6
    assert (out.router_stats > 0).sum() > 4  # the routing is not trivial


def test_authors_layouts_we_cannot_map_fail_clearly(tmp_path):
    authors_checkpoint(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "moe": "2,4"}))
    with pytest.raises(ValueError, match="attention experts"):
        mm.load_bert(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "moe": "four"}))
    with pytest.raises(ValueError, match="'A,E'"):
        mm.load_bert(tmp_path / "a")


def test_save_load_round_trip_keeps_the_extra_head(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertModel
    ids, mask = batch(B=2, T=10)
    for cfg in (tiny(num_experts=3), tiny(relation_head="extra")):
        model = mm.Bert(cfg).eval()
        mm.save_bert(model, tmp_path / cfg.relation_head / str(cfg.num_experts))
        back = mm.load_bert(tmp_path / cfg.relation_head / str(cfg.num_experts))
        assert back.config == cfg and back.relation_proj is not None
        with torch.no_grad():
            a, b = model(ids, mask), back(ids, mask)
        for x, y in zip(a.qkv, b.qkv):
            assert torch.equal(x, y)
    # a dense student with an extra head is still a plain HF BERT (the head is an unused extra tensor)
    hf = BertModel.from_pretrained(tmp_path / "extra" / "1", add_pooling_layer=False, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(ids, attention_mask=mask).last_hidden_state - a.last_hidden_state)[mask.bool()].abs().max() < 1e-5


def test_relation_loss_per_sequence_and_the_originals_dropout():
    torch.manual_seed(0)
    ids, mask = batch(B=4, T=12)
    t = tuple(torch.randn(4, 12, 64, dtype=torch.float64) for _ in range(3))
    s = tuple(torch.randn(4, 12, 32, dtype=torch.float64) for _ in range(3))
    mean = mm.relation_loss(t, s, mask, 4)
    sums, rows = mm.relation_loss(t, s, mask, 4, per_sequence=True)
    assert sums.shape == rows.shape == (4,) and torch.allclose(sums.sum() / rows.sum(), mean, atol=1e-12)
    assert rows.tolist() == [48, 32, 48, 12]
    # dropout: the original's KL(p_t + 1e-7 || dropout(p_s) + 1e-7), checked against a direct float64 loop
    torch.manual_seed(5)
    got = mm.relation_loss(t, s, mask, 4, dropout=0.1)
    torch.manual_seed(5)
    bias = (1 - mask.double())[:, None, None, :] * torch.finfo(torch.float32).min
    total = 0.0
    for x, y in zip(t, s):
        pt = mm.relation_logprobs(x, 4, bias).exp()
        ps = F.dropout(mm.relation_logprobs(y, 4, bias).exp(), 0.1)
        kl = (pt * (torch.log(pt) - torch.log(ps + 1e-7))).nan_to_num().sum(-1)  # (B, R, T); 0·log 0 = 0
        total = total + (kl * mask[:, None, :]).sum() / (mask.sum() * 4)
    assert torch.allclose(got, total / 3, rtol=1e-5)  # relation_logprobs works in float32
    assert got > mean  # dropped entries cost p_t·log(p_t / 1e-7)


@pytest.mark.parametrize("block", [1, 3, 4])
def test_fused_relation_loss_equals_the_readable_one_in_value_and_gradients(block):
    torch.manual_seed(0)
    ids, mask = batch(B=4, T=12)
    t = tuple(torch.randn(4, 12, 48, dtype=torch.float64) for _ in range(3))
    s1 = tuple(torch.randn(4, 12, 24, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s2 = tuple(x.detach().clone().requires_grad_() for x in s1)
    ref = mm.relation_loss(t, s1, mask, 4, fused=False)
    fused = mm.relation_loss(t, s2, mask, 4, fused=True, block=block)
    assert torch.allclose(ref, fused, rtol=1e-10)
    ref.backward()
    fused.backward()
    for a, b in zip(s1, s2):
        assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-12)
        assert b.grad[mask == 0].abs().max() == 0 and b.grad[mask == 1].abs().max() > 0  # padding gets none
    sums, rows = mm.relation_loss(t, s2, mask, 4, per_sequence=True, fused=True)
    assert torch.allclose(sums.sum() / rows.sum(), fused, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda x: mm.relation_loss(t[:1] * 3, (x,) * 3, mask, 4, fused=True, block=block),
                                    (s1[0].detach()[:, :, :].clone().requires_grad_(),))
