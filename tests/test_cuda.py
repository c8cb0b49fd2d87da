"""The CUDA path on a GPU, against the float64 oracles of test_minimoe.py: every dispatch in fp32 and under
bf16 autocast, the grouped path compiled as one graph, a distillation and a finetuning step in each precision,
and the fused relation loss. Without a GPU every test skips, with a reason that names CUDA (conftest.py keeps
such skips skips in CI)."""
import contextlib

import pytest
import torch

import minimoe as mm
import runkeeping as rk
import train_distill as td
from finetune import TaskModel
from test_minimoe import (CASES, batch, moe_case, reference_moe, reference_moe_attention,
                          reference_relation_loss, tiny)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: no GPU on this machine")
DEV = "cuda"
# precision -> (autocast dtype, relative tolerance against float64); fp32 allows TF32 matmuls
PRECISIONS = {"fp32": (None, 5e-3), "bf16": (torch.bfloat16, 4e-2)}


def autocast(precision):
    dtype = PRECISIONS[precision][0]
    return torch.autocast(DEV, dtype=dtype) if dtype else contextlib.nullcontext()


def grouped_runs(precision):
    """Whether an explicit dispatch='grouped' runs on this GPU in this precision (else it must raise)."""
    with autocast(precision):
        return mm.grouped_mm_unfit(torch.zeros(1, device=DEV)) is None


def close(a, b, tol, what):
    err = (a.double() - b).norm() / b.norm().clamp_min(1e-12)
    assert err < tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("dispatch", ["loop", "grouped", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_moe_dispatch_matches_float64_reference_on_cuda(case, dispatch, precision):
    moe, x, mask = moe_case(case)
    moe, mask = moe.to(DEV), mask.to(DEV)
    moe.dispatch = dispatch
    xr = x.to(DEV).clone().requires_grad_()
    if dispatch == "grouped" and not grouped_runs(precision):
        with pytest.raises(ValueError, match="dispatch='grouped' cannot run here"), autocast(precision):
            moe(xr[None], mask[None])
        return
    with autocast(precision):
        y, aux = moe(xr[None], mask[None])  # (1, N, H)
        expert = mm.route(moe.router, xr.detach(), 0.0, False)[1]  # the oracle follows the rounded routing
    assert y.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)  # fp32 stays fp32
    params = [moe.w1, moe.b1, moe.w2, moe.b2, moe.router.weight, moe.router.bias]
    xd = x.detach().to(DEV).double().requires_grad_()
    pd = [p.detach().double().requires_grad_() for p in params]
    y_ref, lb_ref = reference_moe(xd, *pd, mask, expert=expert)
    g = torch.randn_like(y_ref)
    lb_weight = torch.tensor(0.7, dtype=torch.float64, device=DEV)
    torch.autograd.backward([y[0], aux.loss], [g.to(y.dtype), lb_weight.to(aux.loss.dtype)])
    torch.autograd.backward([y_ref, lb_ref], [g, lb_weight])
    tol = PRECISIONS[precision][1]
    close(y[0], y_ref, tol, "output")
    close(aux.loss, lb_ref, tol, "load-balance loss")
    close(xr.grad, xd.grad, tol, "grad x")
    for p, r, name in zip(params, pd, ["w1", "b1", "w2", "b2", "router.weight", "router.bias"]):
        if r.grad.norm() > 0:
            close(p.grad, r.grad, tol, f"grad {name}")


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("dispatch", ["loop", "grouped", "auto"])
def test_attention_experts_match_float64_reference_on_cuda(dispatch, precision):
    att = mm.MoEAttention(tiny(num_attn_experts=3, dispatch=dispatch)).eval()
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.3)
    att = att.to(DEV)
    ids, mask, _ = batch()
    x, mask = torch.randn(*ids.shape, 32, device=DEV), mask.to(DEV)
    key_mask = mask.bool()[:, None, None, :]
    if dispatch == "grouped" and not grouped_runs(precision):
        with pytest.raises(ValueError, match="dispatch='grouped' cannot run here"), autocast(precision):
            att(x, key_mask)
        return
    with autocast(precision):
        y, _, aux = att(x, key_mask)
        expert = mm.route(att.router, x.reshape(-1, 32), 0.0, False)[1]
    close(y.float(), reference_moe_attention(att, x, mask, expert=expert), PRECISIONS[precision][1], "output")
    y.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in att.parameters())


def test_grouped_dispatch_compiles_fullgraph_on_cuda():
    """Where the fused kernel runs: one graph, no host sync, the eager outputs."""
    if not grouped_runs("bf16"):
        pytest.skip("CUDA: no fused grouped GEMM here (needs capability 9.x/10.x); auto takes the loop")
    moe, x, mask = moe_case("padding", N=64, H=32, I=64)
    moe, x, mask = moe.to(DEV), x.to(DEV)[None], mask.to(DEV)[None]
    for dispatch in ("grouped", "auto"):
        moe.dispatch = dispatch
        with autocast("bf16"):
            y_eager, aux_eager = moe(x, mask)
            xc = x.clone().requires_grad_()
            y, aux = torch.compile(moe, fullgraph=True)(xc, mask)
        (y.float().square().sum() + aux.loss).backward()
        assert (y.float() - y_eager.float()).norm() / y_eager.float().norm() < 2e-2
        assert torch.equal(aux.counts, aux_eager.counts) and torch.isfinite(xc.grad).all()


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_one_distillation_and_one_finetuning_step_on_cuda(precision):
    rt = rk.setup_runtime(0, precision)
    assert rt.device.type == DEV
    ids, mask, types = (t.to(DEV) for t in batch(B=4, T=12, pad_from=(None, 8, 5, None)))
    data = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    teacher = mm.Bert(tiny(hidden_size=48, intermediate_size=96)).to(DEV).eval()
    student = mm.Bert(tiny(num_experts=4, num_attn_experts=2)).to(DEV).train()
    opt = rk.configure_optimizer(student, lr=1e-3)
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    with torch.no_grad(), rt.autocast():
        qkv = teacher(ids, mask, types).qkv
    with rt.autocast():
        loss = td.distill_loss(qkv, student, data, num_relation_heads=4)[0]
    rt.scaler.scale(loss).backward()
    assert torch.isfinite(rk.optimizer_step(student, opt, rt.scaler, 1.0))
    assert torch.isfinite(loss) and not torch.equal(before["layers.0.ffn.w1"], student.layers[0].ffn.w1)

    model = TaskModel(student, "cls", 2).to(DEV).train()  # finetuning: the student plus a classifier head
    opt = rk.configure_optimizer(model, lr=1e-3)
    with rt.autocast():
        logits, task_loss, aux = model(ids, mask, types, labels=torch.tensor([0, 1, 1, 0], device=DEV))
        loss = task_loss + 0.01 * aux
    rt.scaler.scale(loss).backward()
    assert torch.isfinite(rk.optimizer_step(model, opt, rt.scaler, 1.0)) and torch.isfinite(loss)
    assert logits.shape == (4, 2) and logits.dtype == torch.float32


def test_fused_relation_loss_matches_readable_and_float64_on_cuda():
    ids, mask, _ = batch()
    B, T = ids.shape
    mask = mask.to(DEV)
    teacher = [torch.randn(B, T, 48, device=DEV) for _ in range(3)]
    student = [torch.randn(B, T, 24, device=DEV, requires_grad=True) for _ in range(3)]
    grads = []
    for fused in (False, True):
        loss = mm.relation_loss(teacher, student, mask, num_relation_heads=4, fused=fused)
        grads.append(torch.autograd.grad(loss, student))
        ref = reference_relation_loss(teacher, student, mask, 4)
        assert abs(loss.item() - ref) < 1e-4 * max(1.0, ref)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
