"""
Measured cost of the mixture of minimal experts: MoE vs dense FFN per dispatch, the student's training
step, inference latency, the whole distillation step vs the teacher's forward, and peak memory.

    python bench.py                             # CPU: a few minutes; prints the table last
    python bench.py --json runs/bench_cpu.json  # also writes the ratios, raw timings and the machine
    python bench.py --quick                     # a smoke test: tiny stand-ins, 1 thread, seconds, no targets
    python bench.py --profile                   # + torch.profiler tables of one call of each variant
    python bench.py --table A.json [B.json]     # the table of a saved run (and how a second run differs)
    python bench.py --authors DIR --json PATH   # our distillation step vs the authors' (README: setup)
    python bench.py --device_check              # the one-command GPU check (tests/test_bench.py: --quick)

A row is the median (and min-max spread) of per-round ratios of variants timed in interleaved rounds, so
that a noisy shared machine slows them alike, after each variant ran alone in its memory window (2 training
steps, so that optimizer state exists, or 1 forward). Each section reports the load average before and
after it; absolute times are context only. CPU: fp32; CUDA: bf16 autocast, CUDA events, MFU. --quick rows
time stand-ins (a third of the layers, width 64, 16 tokens): named "smoke" and for their shapes, no target.

OMP_WAIT_POLICY defaults to PASSIVE: on a shared, oversubscribed machine libgomp's spinning threads steal
the cores from the working ones, hitting the MoE's extra small ops hardest (`OMP_WAIT_POLICY=ACTIVE` to
measure the spinning default).

Memory is what a variant adds to what was allocated before it was built (CUDA: max_memory_allocated; Linux
CPU: the peak RSS): weights, gradients, optimizer state, peak activations; inference rows: activations only.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see the docstring

import argparse
import contextlib
import ctypes
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import replace
from statistics import median

import torch
from torch.profiler import ProfilerActivity, profile

import minimoe as mm
from runkeeping import NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, configure_optimizer, optimizer_step, \
    run_script, setup_runtime, writable_file
from train_distill import distill_loss

HERE = os.path.dirname(os.path.abspath(__file__))  # the repository: tests/, results/
E = 4  # experts of every MiniMoE here (the paper's "1,4E")
SWEEP = 2  # students of the sweep row
SIZES = {  # batch sizes per device and section; 16 = the batch of train_distill.py's CPU demo
    "cpu": dict(ffn=64, student=16, infer=(32, 1), distill=32),
    "cuda": dict(ffn=64, student=128, infer=(32, 1), distill=128),
}
QUICK_SIZES = dict(ffn=2, student=2, infer=(2, 1), distill=2)
TARGETS = dict(ffn=1.10, ffn_cuda=1.15, student=1.10, infer=1.05, infer_1=1.25, distill=1.45, sweep=1.0)
PEAK_BF16_TFLOPS = [  # dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets; first match wins
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0)]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", type=writable_file,
                   help="also write the results here (checked before any timing; its folder is made)")
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny stand-ins, 1 thread, 2 rounds")
    p.add_argument("--repeats", type=POSITIVE_INT, default=7,
                   help="timed rounds of the light sections (the FFN; inference at 1x128: x3)")
    p.add_argument("--heavy", type=POSITIVE_INT, default=3, help="timed rounds of the steps of seconds")
    p.add_argument("--warmup", type=NONNEGATIVE_INT, default=1, help="interleaved warm-up rounds (light)")
    p.add_argument("--threads", type=POSITIVE_INT, help="torch CPU threads (default: all; --quick: 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models in the CUDA section; on "
                   "CPU, add a distillation step whose student forward and loss are compiled")
    p.add_argument("--peak_tflops", type=POSITIVE, help="peak dense bf16 TFLOP/s, for MFU (default: by GPU)")
    p.add_argument("--skip_cpu", action="store_true", help="the CUDA section only")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of one call of each variant")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the table of a saved --json run (no "
                   "measuring); with a second run, each row's ratio there and the difference")
    p.add_argument("--authors", metavar="DIR", help="only time our whole distillation step against the "
                   "authors' (a checkout of github.com/GeneZC/MiniMoE; needs transformers 4.x)")
    p.add_argument("--device_check", action="store_true", help="the GPU check in one command (CUDA rows, "
                   "compiled FFN, CUDA tests, a short distillation; no GPU: on CPU) into --json "
                   "(results/device_check.json)")
    p.add_argument("--seed", type=int, default=0)
    return p


# -----------------------------------------------------------------------------
# helpers: inputs, memory; Bench: one device's settings, timing and rows


def fake_batch(B, T, vocab, device, seed):
    """Real-looking BERT inputs: [CLS] A [SEP] B [SEP] of random WordPiece ids; every other row is
    padded from a random length in [T/2, T) on (attention_mask 0, [PAD] = 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, vocab, (B, T), generator=g)
    lengths = torch.where(torch.arange(B) % 2 == 0, T, torch.randint(T // 2, T, (B,), generator=g))  # (B,)
    pos = torch.arange(T)[None, :]  # (1, T)
    mask = (pos < lengths[:, None]).long()  # (B, T)
    mid = (lengths // 2)[:, None]  # (B, 1)
    types = ((pos > mid) & (mask == 1)).long()  # segment B after the middle [SEP]
    ids[:, 0] = 101  # [CLS]
    ids[(pos == mid) | (pos == lengths[:, None] - 1)] = 102  # [SEP]
    batch = dict(input_ids=ids * mask, attention_mask=mask, token_type_ids=types)
    return {k: v.to(device) for k, v in batch.items()}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def proc_status(key):
    """A /proc/self/status field (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def load_avg():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class Bench:
    """One device's run: the settings the arguments give (--quick: tiny stand-ins, 2 rounds), and the rows,
    peak memory and results of what it measures, section by section."""

    def __init__(self, device, args):
        self.device, self.cuda, self.args, self.quick = device, device == "cuda", args, args.quick
        self.T = 16 if args.quick else 128  # tokens per sequence
        self.vocab = 2000 if args.quick else 30522  # BERT uncased WordPiece
        self.sizes = QUICK_SIZES if args.quick else SIZES[device]  # batch sizes per section
        rounds = (2, 2, 0) if args.quick else (args.repeats, args.heavy, args.warmup)
        self.repeats, self.heavy, self.warmup = rounds  # timed rounds: light, heavy; warm-up rounds
        self.rows, self.mem = [], {}
        self.res = dict(timings_s={}, section_s={}, load_avg={})
        self.t0, self.load0 = time.time(), load_avg()

    def cfg(self, name, **kw):
        """A preset; --quick shrinks it to a third of its layers at width 64 (the teacher 128)."""
        if self.quick:
            w = 128 if name == "12L-768H" else 64
            kw = dict(vocab_size=self.vocab, num_layers=mm.BertConfig.preset(name).num_layers // 3,
                      hidden_size=w, intermediate_size=4 * w, num_heads=4, **kw)
        return mm.BertConfig.preset(name, **kw)

    def shape(self, name):
        """What rows call a preset: the shape timed ("3L-384H"; --quick: its stand-in's, "1L-64H")."""
        c = self.cfg(name)
        return f"{c.num_layers}L-{c.hidden_size}H"

    def amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def compiled(self, model):
        return torch.compile(model) if self.cuda and self.args.compile else model

    def batch(self, B):
        return fake_batch(B, self.T, self.vocab, self.device, self.args.seed)

    def build(self, key, make, calls):
        """make() -> fn, built and called `calls` times alone (the variant's warm-up) inside a memory window:
        self.mem[key] := the peak MiB it added (None where the OS does not tell). Returns fn."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that the baseline is live
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
            base = proc_status("VmRSS")
        fn = make()
        for _ in range(calls):
            fn()
        sync(self.device)
        peak = torch.cuda.max_memory_allocated() if self.cuda else proc_status("VmHWM")
        self.mem[key] = None if peak is None or base is None else round((peak - base) / 2**20, 1)
        return fn

    def time(self, fns, warmup, repeats):
        """Seconds of each call of fns[name](), interleaved: every round calls each fn once, in order.
        CUDA: events around the call after a synchronize (host syncs inside the call count in its time)."""
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                sync(self.device)
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    torch.cuda.synchronize()
                    times[name].append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        return times

    def row(self, name, t, num, den, target, den_scale=1):
        """A row of the per-round ratios t[num][i] / (den_scale * t[den][i]): their median, judged against
        the target (--quick: none, "smoke ..."), and their spread. Returns the median."""
        ratios = [x / (den_scale * y) for x, y in zip(t[num], t[den])]
        if self.quick:
            name, target = f"smoke {name}", None
        r = median(ratios)
        self.rows.append(dict(device=self.device, name=name, ratio=r, min=min(ratios), max=max(ratios),
                              rounds=len(ratios), target=target, ok=None if target is None else r <= target))
        return r

    def done(self, section, fns):
        """Close a section: its seconds, the load average before and after; --profile: one call's tables."""
        self.res["section_s"][section] = round(time.time() - self.t0, 1)
        self.res["load_avg"][section] = [self.load0, load_avg()]  # 1-minute load average before, after
        print(f"{self.device} {section}: {self.res['section_s'][section]:.0f} s, load {self.load0} -> "
              f"{self.res['load_avg'][section][1]}", flush=True)
        if self.args.profile:
            activities = [ProfilerActivity.CPU]
            if self.cuda:
                activities.append(ProfilerActivity.CUDA)
            for name, fn in fns.items():
                with profile(activities=activities) as prof:
                    fn()
                    sync(self.device)
                print(f"\n== profile: {section} {name} ({self.device}), one call ==")
                sort = f"self_{'cuda' if self.cuda else 'cpu'}_time_total"
                print(prof.key_averages().table(sort_by=sort, row_limit=15))
        self.t0, self.load0 = time.time(), load_avg()


def train_step(b, model, batch, teacher_qkv, compile_loss=False):
    """One optimizer step as in train_distill.py: relation loss + 0.01 load balance, backward, clip, AdamW
    (bf16 or fp32: its GradScaler disabled). teacher_qkv: q, k, v or a function returning them.
    compile_loss: torch.compile the student's forward and loss (inductor fuses dropout, GELU, softmaxes)."""
    opt, scaler = configure_optimizer(model, lr=1e-4), torch.amp.GradScaler("cuda", enabled=False)
    raw, model = model, b.compiled(model)
    loss_fn = torch.compile(distill_loss) if compile_loss else distill_loss

    def step():
        qkv = teacher_qkv() if callable(teacher_qkv) else teacher_qkv
        with b.amp():
            loss = loss_fn(qkv, model, batch)[0]
        scaler.scale(loss).backward()
        optimizer_step(raw, opt, scaler, 1.0)
        scaler.update()
    return step


def ffn_step(b, config, x, dy, mask, backend=None):
    """Forward + backward of the FFN of a one-layer `Bert` of `config`, initialised as Bert initialises it
    and seeded: every dispatch gets the same expert weights. backend: torch.compile it with that backend."""
    torch.manual_seed(b.args.seed)
    m = mm.Bert(replace(config, num_layers=1, vocab_size=8, relation_head="layer")).layers[0].ffn.to(b.device)
    m = torch.compile(m, backend=backend) if backend else b.compiled(m)

    def step():
        with b.amp():
            y, aux = m(x, mask)  # (B, T, H), MoEAux or None
            loss = (y.float() * dy).sum() + (0.01 * aux.loss if aux is not None else 0.0)
        loss.backward()
        x.grad = None
        m.zero_grad(set_to_none=True)
    return step


def ffn_inputs(b):
    """The students' FFN config (H = 384, I = 1536), an input with its gradient, dy and a token mask."""
    scfg, B = b.cfg("3L-384H"), b.sizes["ffn"]
    torch.manual_seed(b.args.seed)
    x = torch.randn(B, b.T, scfg.hidden_size, device=b.device, requires_grad=True)  # (B, T, H)
    dy = torch.randn(B, b.T, scfg.hidden_size, device=b.device)  # (B, T, H)
    return scfg, x, dy, b.batch(B)["attention_mask"]  # mask: (B, T)


# -----------------------------------------------------------------------------
# the sections, one device at a time


def ffn_section(b):
    """1. The MoE FFN per dispatch vs the dense FFN of one expert's size, fwd + bwd (with router noise)."""
    scfg, x, dy, mask = ffn_inputs(b)
    B = b.sizes["ffn"]
    with b.amp():  # the grouped GEMM only where it runs as asked (CUDA: bf16 on compute capability 9.x/10.x)
        auto = mm.resolve_dispatch("auto", x)
        dispatches = ["loop", "grouped"] if mm.grouped_mm_unfit(x) is None else ["loop"]
    fns = {}
    for name in ["dense"] + dispatches:
        config = scfg if name == "dense" else replace(scfg, num_experts=E, dispatch=name)
        fns[name] = b.build(f"ffn_{name}", lambda: ffn_step(b, config, x, dy, mask), calls=2)
    t = b.time(fns, b.warmup, b.repeats)
    target = TARGETS["ffn_cuda" if b.cuda else "ffn"]
    ratios = {d: b.row(f"moe_ffn {d}{' (= auto)' if d == auto else ''} vs dense, {B}x{b.T} tok",
                       t, d, "dense", target) for d in dispatches}
    if b.cuda and "grouped" in fns:
        b.row("moe_ffn grouped vs loop", t, "grouped", "loop", 1.0)  # the grouped GEMM must win
    b.res["timings_s"]["ffn"] = t
    b.res["ffn"] = dict(tokens=B * b.T, H=scfg.hidden_size, I=scfg.intermediate_size, E=E, ratios=ratios,
                        auto_resolves_to=auto, dense_ms=1e3 * median(t["dense"]))
    b.res["moe_ffn_vs_dense"] = min(ratios.values())  # the best dispatch, which the target is for
    b.done("ffn", fns)


def student_section(b):
    """2. The student's training step, MoE vs dense: forward + backward + clip + AdamW on the real
    distillation loss, the same relation head on both (the experts' cost alone)."""
    B = b.sizes["student"]
    batch = b.batch(B)
    H_t = b.cfg("12L-768H").hidden_size
    tq = tuple(torch.randn(B, b.T, H_t, device=b.device) for _ in range(3))  # a teacher's q, k, v
    b.res["student"] = {}
    for preset in ("3L-384H", "6L-384H"):
        shape, fns = b.shape(preset), {}
        for name, n_exp in (("dense", 1), ("moe", E)):
            torch.manual_seed(b.args.seed)
            config = b.cfg(preset, num_experts=n_exp, relation_head="extra")
            fns[name] = b.build(f"student_{shape}_{name}", calls=2,
                                make=lambda: train_step(b, mm.Bert(config).to(b.device).train(), batch, tq))
        t = b.time(fns, 0, b.heavy)
        r = b.row(f"student_step {shape} E={E} vs dense, {B}x{b.T}", t, "moe", "dense", TARGETS["student"])
        flops = 3 * B * mm.count_flops(b.cfg(preset), b.T)["flops_per_sequence"]  # fwd + bwd, model FLOPs
        b.res["timings_s"][f"student_{shape}"] = t
        b.res["student"][shape] = dict(ratio=r, batch=B, dense_ms=1e3 * median(t["dense"]),
                                       moe_ms=1e3 * median(t["moe"]),
                                       dense_tflops=flops / median(t["dense"]) / 1e12)
    b.res["student_step_vs_dense"] = max(v["ratio"] for v in b.res["student"].values())  # the worse of two
    b.done("student", fns)


def inference_section(b):
    """3. Inference latency (eval mode: no dropout, no router noise) and throughput, MoE vs dense, as
    deployed (no extra relation head); for 3L-384H also the MoE with its experts compressed to rank-`rank`
    factors (compress_experts, per expert; the downstream study's 1,4E r64). Weights' memory apart."""
    rank = 16 if b.quick else 64
    b.res["inference"] = {}
    for preset in ("3L-384H", "6L-384H"):
        shape, models = b.shape(preset), {}
        for name, n_exp in (("dense", 1), ("moe", E)):
            torch.manual_seed(b.args.seed)
            config = b.cfg(preset, num_experts=n_exp, relation_head="layer")
            models[name] = b.build(f"weights_{shape}_{name}", calls=0,
                                   make=lambda: b.compiled(mm.Bert(config).to(b.device).eval()))
        if preset == "3L-384H":
            compress = lambda: mm.compress_experts(models["moe"], rank, "per_expert").eval()  # noqa: E731
            models[f"moe_r{rank}"] = b.build(f"weights_{shape}_moe_r{rank}", compress, calls=0)
        for B in b.sizes["infer"]:
            batch, tag, fns = b.batch(B), f"{B}x{b.T}", {}
            for name, model in models.items():
                def forward(model=model, batch=batch):  # bound now, as the loops move on
                    with torch.inference_mode(), b.amp():
                        return model(**batch)
                fns[name] = b.build(f"infer_{shape}_{tag}_{name}", lambda: forward, calls=1)
            light = B == 1  # milliseconds a call: more rounds, and a warm-up
            t = b.time(fns, b.warmup if light else 0, b.repeats * 3 if light else b.heavy)
            r = b.row(f"inference {shape} E={E} vs dense, {tag}", t, "moe", "dense",
                      TARGETS["infer_1" if light else "infer"])
            if f"moe_r{rank}" in fns:
                b.row(f"inference {shape} E={E} rank-{rank} experts vs E={E}, {tag}", t, f"moe_r{rank}",
                      "moe", 1.0)
            b.res["timings_s"][f"infer_{shape}_{tag}"] = t
            b.res["inference"][f"{shape} {tag}"] = dict(
                ratio=r, **{f"{name}_ms": 1e3 * median(ts) for name, ts in t.items()},
                dense_seq_per_s=B / median(t["dense"]), moe_seq_per_s=B / median(t["moe"]))
    b.res["inference_vs_dense"] = max(v["ratio"] for v in b.res["inference"].values())  # the worst case
    b.done("inference", fns)


def distill_section(b):
    """4. The whole distillation step vs the teacher's forward alone, in milliseconds and model FLOP/s (the
    relation loss not counted; CUDA: MFU). In the same rounds, a sweep's step (train_distill --students:
    SWEEP students share each teacher forward) vs SWEEP runs of their own, and with --compile on CPU a step
    whose student forward and loss are compiled."""
    B = b.sizes["distill"]
    batch = b.batch(B)
    tcfg, scfg = b.cfg("12L-768H"), b.cfg("6L-384H", num_experts=E)
    torch.manual_seed(b.args.seed)
    teacher = b.compiled(mm.Bert(tcfg).to(b.device).eval().requires_grad_(False))

    def teacher_forward():
        with torch.no_grad(), b.amp():
            return teacher(**batch).qkv  # the last layer's q, k, v

    fns = {"teacher_forward": b.build(f"teacher_{b.shape('12L-768H')}_forward", lambda: teacher_forward, 1)}
    fns["distill_step"] = b.build(f"distill_step_{b.shape('6L-384H')}_E{E}_over_teacher", calls=1,
                                  make=lambda: train_step(b, mm.Bert(scfg).to(b.device).train(), batch,
                                                          teacher_forward))
    shared = {}  # the sweep's students' weights are made before its memory window
    sweep_steps = [train_step(b, mm.Bert(scfg).to(b.device).train(), batch, lambda: shared["qkv"])
                   for _ in range(SWEEP)]

    def sweep():
        shared["qkv"] = teacher_forward()
        for step in sweep_steps:
            step()

    fns[f"sweep_{SWEEP}_students"] = b.build(f"sweep_{SWEEP}_students_over_one", lambda: sweep, calls=1)
    if b.args.compile and not b.cuda:  # on CUDA --compile compiles every model already
        t0 = time.time()
        fns["distill_step_compiled"] = train_step(b, mm.Bert(scfg).to(b.device).train(), batch,
                                                  teacher_forward, compile_loss=True)
        for _ in range(5):  # compiles, then recompiles until the experts' token counts are dynamic
            fns["distill_step_compiled"]()
        b.res["compile_s"] = round(time.time() - t0, 1)
    t = b.time(fns, 0, b.heavy)
    b.res["timings_s"]["distill"] = t
    tf, ts = median(t["teacher_forward"]), median(t["distill_step"])
    f_teacher = B * mm.count_flops(tcfg, b.T)["flops_per_sequence"]
    f_distill = f_teacher + 3 * B * mm.count_flops(scfg, b.T)["flops_per_sequence"]
    d = dict(batch=B, teacher_forward_ms=1e3 * tf, distill_step_ms=1e3 * ts,
             flop_ratio=f_distill / f_teacher,
             teacher_forward_tflops=f_teacher / tf / 1e12,
             distill_step_tflops=f_distill / ts / 1e12)
    b.res["distill"] = d  # the MFU keys below are added to it
    if b.cuda:
        gpu = torch.cuda.get_device_name()
        peak = b.args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS if k in gpu), None)
        b.res["peak_bf16_tflops"] = peak
        if peak:
            d["teacher_forward_mfu"] = d["teacher_forward_tflops"] / peak
            d["distill_step_mfu"] = d["distill_step_tflops"] / peak
    pair = f"{b.shape('12L-768H')} teacher + {b.shape('6L-384H')} E={E}"
    b.res["distill_vs_teacher_forward"] = b.row(f"distill_step ({pair}) vs teacher fwd, {B}x{b.T}", t,
                                                "distill_step", "teacher_forward", TARGETS["distill"])
    if "distill_step_compiled" in t:
        b.row(f"distill_step, student fwd + loss compiled, vs teacher fwd, {B}x{b.T}", t,
              "distill_step_compiled", "teacher_forward", TARGETS["distill"])
    r = b.row(f"sweep: {SWEEP} students on one teacher fwd vs {SWEEP} runs, {B}x{b.T}", t,
              f"sweep_{SWEEP}_students", "distill_step", TARGETS["sweep"], den_scale=SWEEP)
    b.res["sweep"] = dict(students=SWEEP, ratio=r, saving=1 - r,
                          step_ms=1e3 * median(t[f"sweep_{SWEEP}_students"]))
    b.done("distill", fns)


def relation_loss_section(b):
    """5. The relation loss alone, fwd + bwd: readable vs fused (ChunkedRelationKL, 8 heads a block)."""
    B = b.sizes["distill"]
    token_mask = b.batch(B)["attention_mask"]  # (B, T)
    torch.manual_seed(b.args.seed)
    H_t, H_s = b.cfg("12L-768H").hidden_size, b.cfg("6L-384H").hidden_size
    teacher_qkv = tuple(torch.randn(B, b.T, H_t, device=b.device) for _ in range(3))
    student_qkv = tuple(torch.randn(B, b.T, H_s, device=b.device, requires_grad=True) for _ in range(3))
    fns = {}
    for name, fused in (("readable", False), ("fused", True)):
        def step(fused=fused):  # fused bound now, as the loop moves on
            mm.relation_loss(teacher_qkv, student_qkv, token_mask, 32, fused=fused).backward()
            for x in student_qkv:
                x.grad = None
        fns[name] = b.build(f"relation_loss_{name}", lambda: step, calls=1)
    t = b.time(fns, b.warmup, b.heavy)
    r = b.row(f"relation_loss fused vs readable, fwd+bwd {B}x{b.T}, R=32", t, "fused", "readable", 1.0)
    b.res["timings_s"]["relation_loss"] = t
    b.res["relation_loss"] = dict(batch=B, relation_heads=32, ratio=r,
                                  readable_ms=1e3 * median(t["readable"]), fused_ms=1e3 * median(t["fused"]),
                                  readable_mib=b.mem["relation_loss_readable"],
                                  fused_mib=b.mem["relation_loss_fused"])
    b.done("relation_loss", fns)


def measure(b):
    """Every section on b's device; returns its results (rows, peak memory, timings, figures)."""
    for section in (ffn_section, student_section, inference_section, distill_section, relation_loss_section):
        section(b)
    b.res["peak_memory_mib"], b.res["rows"] = b.mem, b.rows
    return b.res


# -----------------------------------------------------------------------------
# the authors' code side by side (their classes imported from a checkout, never copied)


def their_step(authors, shape, vocab, batch):
    """Their step as their training script takes it: BertMiniLM teacher, MoEBertMiniLM student (4 experts of
    4H neurons split by moefy from one wide FFN), loss_fn, loss.item(), clip 5, transformers.AdamW.
    Returns (step, student)."""
    transformers, BertMiniLM, MoEBertMiniLM = authors
    L_t, L_s, H, R = shape

    def config(layers, moe=False):  # the edits their scripts make to a bert-base config
        c = transformers.BertConfig(num_hidden_layers=layers, hidden_size=H, num_attention_heads=12,
                                    intermediate_size=4 * H * (4 if moe else 1), vocab_size=vocab)
        c.num_relation_heads, c.attention_head_size = R, H // 12
        return c

    teacher = BertMiniLM(config(L_t)).eval()
    student = MoEBertMiniLM(config(L_s, moe=True))
    student.bert.moefy("1,4")
    student.config.moe = "1,4"
    no_decay = ("bias", "LayerNorm.weight")
    named = list(student.named_parameters())
    groups = [dict(params=[p for n, p in named if not any(k in n for k in no_decay)], weight_decay=0.01),
              dict(params=[p for n, p in named if any(k in n for k in no_decay)], weight_decay=0.0)]
    opt = transformers.AdamW(groups, lr=3e-4)
    inputs = [batch["input_ids"], batch["attention_mask"].bool(), batch["token_type_ids"]]

    def step():
        student.train()
        with torch.no_grad():
            t_out = teacher(inputs)
        loss = MoEBertMiniLM.loss_fn(t_out, student(inputs))
        loss.item()  # their loop logs every step's loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        opt.zero_grad()
    return step, student


def authors_side_by_side(b, repo):
    """Our whole distillation step (train_distill's distill_loss, optimizer_step with clip 1, torch's AdamW)
    against the authors', the shapes of the original comparison: a 6L-384H teacher and a 3L-384H 1,4E
    student at 32x128 with padding, fp32, one process, rounds interleaved, random weights on both sides.
    Their relations come from an extra Q/K/V head, the teacher's in all its layers."""
    if not os.path.isdir(repo):
        raise SystemExit(f"--authors {repo}: no such directory (a checkout of github.com/GeneZC/MiniMoE)")
    sys.path.insert(0, os.path.abspath(repo))
    try:
        import transformers
        from models.bert_minilm import BertMiniLM
        from models.moebert_minilm import MoEBertMiniLM
    except ImportError as e:
        raise SystemExit(f"--authors {repo}: cannot import the authors' models ({e}). Give a checkout of "
                         "github.com/GeneZC/MiniMoE and run in an environment with transformers 4.x (4.23 "
                         "installs on Python 3.11); see the README") from None
    B, L_t, L_s, H, R = (2, 2, 1, 48, 4) if b.quick else (32, 6, 3, 384, 32)
    torch.manual_seed(b.args.seed)
    batch = b.batch(B)
    theirs, s_theirs = their_step((transformers, BertMiniLM, MoEBertMiniLM), (L_t, L_s, H, R), b.vocab, batch)
    config = mm.BertConfig(vocab_size=b.vocab, num_layers=L_t, hidden_size=H, intermediate_size=4 * H,
                           num_heads=12, relation_head="layer")
    teacher = mm.Bert(config).eval().requires_grad_(False)
    s_ours = mm.Bert(replace(config, num_layers=L_s, num_experts=E, relation_head="extra")).train()
    opt, scaler = configure_optimizer(s_ours, lr=3e-4), torch.amp.GradScaler("cuda", enabled=False)

    def ours():
        with torch.no_grad():
            qkv = teacher(**batch).qkv
        loss = distill_loss(qkv, s_ours, batch, num_relation_heads=R)[0]
        loss.backward()
        optimizer_step(s_ours, opt, scaler, 1.0)

    fns = {"theirs": theirs, "ours": ours}
    for fn in fns.values():  # warm-up: optimizer state exists
        fn()
        fn()
    t = b.time(fns, 0, 2 if b.quick else max(b.heavy, 5))
    b.row(f"authors' code: our distill step vs theirs, {L_t}L-{H}H teacher + {L_s}L-{H}H E={E}, {B}x{b.T}",
          t, "ours", "theirs", 0.30)
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in (("ours", s_ours), ("theirs", s_theirs))}
    return dict(rows=b.rows, timings_s=t, transformers=transformers.__version__,
                ours_ms=1e3 * median(t["ours"]), theirs_ms=1e3 * median(t["theirs"]), student_params=n)


# -----------------------------------------------------------------------------
# the machine, saved runs, the table


def machine():
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    m = dict(cpu=cpu, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
             omp_wait_policy=os.environ["OMP_WAIT_POLICY"], torch=torch.__version__,
             python=platform.python_version(),
             load_avg_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None)
    if torch.cuda.is_available():
        m.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return m


def read_saved_runs(paths):
    """The JSON files of saved runs (--table), each checked to be what --json writes."""
    if len(paths) > 2:
        raise SystemExit("--table takes one saved run, or two to compare")
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--table {path}: cannot read it ({type(e).__name__}: {e})") from None
        if not isinstance(run, dict) or not {"machine", "args", "wall_s"} <= set(run):
            raise SystemExit(f"--table {path}: not a run saved by bench.py --json "
                             "(no machine, args and wall_s)")
        runs.append(run)
    return runs


def print_table(out, other=None):
    """The machine, each section's figures (memory, load, throughput) and the table of one run's JSON; with
    `other` (a second run's JSON), each row's median there and the relative difference of the two medians."""
    m, rows = out["machine"], []
    print(f"\ntorch {m['torch']}, {m['threads']} threads (OMP_WAIT_POLICY={m['omp_wait_policy']}), {m['cpu']}"
          + (f", GPU {m['gpu']}" if "gpu" in m else "")
          + f", load avg {m['load_avg_at_start'][0]:.1f} -> {m['load_avg_at_end'][0]:.1f}"
          + f"; {out['wall_s']:.0f} s")
    if "authors" in out:
        a = out["authors"]
        rows += a["rows"]
        print(f"authors' code (transformers {a['transformers']}): theirs {a['theirs_ms']:.0f} ms, ours "
              f"{a['ours_ms']:.0f} ms a step; student parameters {a['student_params']}")
    for dev, res in (("cpu", out if "peak_memory_mib" in out else None), ("cuda", out.get("cuda"))):
        if res is None:
            continue
        rows += res["rows"]
        print(f"{dev} peak memory added, MiB: "
              + ", ".join(f"{k} {v:.0f}" for k, v in res["peak_memory_mib"].items() if v is not None))
        print(f"{dev} load average before -> after each section: "
              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in res.get("load_avg", {}).items()))
        print(f"{dev} inference seq/s dense/MoE: "
              + ", ".join(f"{k} {v['dense_seq_per_s']:.1f}/{v['moe_seq_per_s']:.1f}"
                          for k, v in res["inference"].items()))
        d = res["distill"]
        mfu = (f", MFU {d['teacher_forward_mfu']:.1%} / {d['distill_step_mfu']:.1%}"
               if "distill_step_mfu" in d else "")
        print(f"{dev} teacher forward {d['teacher_forward_ms']:.0f} ms ({d['teacher_forward_tflops']:.3f} "
              f"TFLOP/s), distillation step {d['distill_step_ms']:.0f} ms ({d['distill_step_tflops']:.3f} "
              f"TFLOP/s){mfu}")
    if not rows:
        raise SystemExit("nothing measured (--skip_cpu without a GPU)")
    quick = out["args"]["quick"]
    if quick:
        print("\n--quick: a smoke test on tiny stand-ins (a third of the layers, width 64, 16 tokens), rows "
              "named for them; no targets, which are for the real sizes (python bench.py)")
    sections = (other, other.get("cuda"), other.get("authors")) if other else ()
    again = {(r["device"], r["name"]): r["ratio"] for sec in sections if sec for r in sec.get("rows", [])}
    w = max(len(r["device"] + r["name"]) for r in rows) + 1
    run2 = "   run 2  diff" if other else ""
    print(f"\n{'name':<{w}} {'ratio':>7} {'min-max':>13} {'target':>7}  result{run2}"
          "  (per-round ratios of interleaved rounds: median, spread)")
    for r in rows:
        judged = r["target"] is not None and not quick  # quick runs saved before smoke rows had targets
        target = f"{r['target']:>6.2f}x" if judged else f"{'-':>7}"
        result = ("pass" if r["ok"] else "MISS") if judged else "smoke test: no target"
        spread = f"{r['min']:.2f}-{r['max']:.2f}" if "min" in r else ""
        line = f"{r['device'] + ' ' + r['name']:<{w}} {r['ratio']:>6.3f}x {spread:>13} {target}  {result:<6}"
        if (r["device"], r["name"]) in again:
            r2 = again[(r["device"], r["name"])]
            line += f" {r2:>6.3f}x {(r2 - r['ratio']) / r['ratio']:+6.1%}"
        print(line.rstrip())


# -----------------------------------------------------------------------------
# the device check: what a person with a GPU runs in one command (--quick: the same at test size, on CPU)


def compiled_ffn(b):
    """Section 1's FFN compiled, MoE (auto dispatch) vs dense: a row, and tokens/s of each. Inductor on
    CUDA; aot_eager on CPU (the trace without C++ codegen, to keep a CPU check to seconds)."""
    scfg, x, dy, mask = ffn_inputs(b)
    B, backend = b.sizes["ffn"], "inductor" if b.cuda else "aot_eager"
    fns = {}
    for name, n in (("dense", 1), ("moe", E)):  # 5 calls: the loop recompiles until its experts' token
        config = replace(scfg, num_experts=n)  # counts are dynamic
        fns[name] = b.build(f"ffn_{name}_compiled", calls=5,
                            make=lambda: ffn_step(b, config, x, dy, mask, backend))
    t = b.time(fns, b.warmup, b.repeats)
    with b.amp():
        auto = mm.resolve_dispatch("auto", x)
    b.row(f"moe_ffn compiled ({auto}) vs dense compiled, {B}x{b.T} tok", t, "moe", "dense",
          TARGETS["ffn_cuda" if b.cuda else "ffn"])
    return {name: B * b.T / median(ts) for name, ts in t.items()}


def short_distillation(b, steps):
    """`steps` optimizer steps as train_distill.py takes them (its runtime, precision, distill_loss and
    optimizer_step), from a random-init 12L-768H teacher (the default teacher's 90 MB need not travel) into
    a 6L-384H 1,4E student, on synthetic batches (no corpus, no `datasets`)."""
    rt = setup_runtime(b.args.seed)  # bf16 autocast on a CUDA device that has it, else fp32
    B = b.sizes["distill"]
    teacher = mm.Bert(b.cfg("12L-768H")).to(rt.device).eval().requires_grad_(False)
    student = mm.Bert(b.cfg("6L-384H", num_experts=E)).to(rt.device).train()
    opt = configure_optimizer(student, lr=3e-4)
    batches = [fake_batch(B, b.T, b.vocab, rt.device, b.args.seed + i) for i in range(4)]
    losses = []
    for step in range(steps):
        if step == 1:  # the first step warms up: time the rest
            sync(rt.device.type)
            t0 = time.time()
        batch = batches[step % len(batches)]
        with torch.no_grad(), rt.autocast():
            qkv = teacher(**batch).qkv
        with rt.autocast():
            loss = distill_loss(qkv, student, batch)[0]
        rt.scaler.scale(loss).backward()
        optimizer_step(student, opt, rt.scaler, 1.0)
        rt.scaler.update()
        if step in (0, steps - 1):
            losses.append(loss.item())  # sync-ok: logging, first and last step
    sync(rt.device.type)
    return dict(steps=steps, batch=B, precision=str(rt.amp_dtype or torch.float32), first_loss=losses[0],
                last_loss=losses[-1], tokens_per_s=(steps - 1) * B * b.T / (time.time() - t0))


def device_check(b):
    """measure()'s rows (CUDA: eager bf16, with MFU), the compiled FFN, tests/test_cuda.py (a process of
    its own) and short_distillation, in one JSON (no GPU: on CPU). Returns them and whether all passed."""
    res = measure(b)
    ffn_compiled = compiled_ffn(b)  # its row joins res["rows"]
    pytest = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    tests = subprocess.run(pytest, cwd=HERE, capture_output=True, text=True)
    lines = (tests.stdout + tests.stderr).strip().splitlines() or [""]
    if tests.returncode:
        print("\n".join(lines[-40:]))
    distill = short_distillation(b, 4 if b.quick else 100)
    d = res["distill"]
    tok = dict(ffn={k: res["ffn"]["tokens"] / median(v) for k, v in res["timings_s"]["ffn"].items()},
               ffn_compiled=ffn_compiled, distill_step=d["batch"] * b.T / d["distill_step_ms"] * 1e3,
               short_distillation=distill["tokens_per_s"])
    res["device_check"] = dict(tokens_per_s=tok, tests=dict(returncode=tests.returncode, summary=lines[-1]),
                               short_distillation=distill, peak_bf16_tflops=res.get("peak_bf16_tflops"))
    print(f"\n{b.device} tokens/s: " + ", ".join(f"ffn {k} {v:,.0f}" for k, v in tok["ffn"].items())
          + ", " + ", ".join(f"ffn compiled {k} {v:,.0f}" for k, v in ffn_compiled.items())
          + f", distill step {tok['distill_step']:,.0f}")
    print(f"tests/test_cuda.py: {lines[-1]} (exit {tests.returncode})")
    print(f"short distillation ({distill['steps']} steps, {distill['precision']}): loss "
          f"{distill['first_loss']:.4f} -> {distill['last_loss']:.4f}, "
          f"{distill['tokens_per_s']:,.0f} tokens/s")
    finite = all(math.isfinite(distill[k]) for k in ("first_loss", "last_loss"))
    return res, tests.returncode == 0 and finite


# -----------------------------------------------------------------------------
# run: CPU, then CUDA when present; the JSON; the table last


def run(args):
    """Measure what the arguments ask, write the JSON, print the table. Returns the device check's verdict."""
    t_start, passed = time.time(), True
    out = dict(machine=machine(), args=vars(args), cuda=None)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.authors:  # the side-by-side alone
        out["authors"] = authors_side_by_side(Bench("cpu", args), args.authors)
        args.skip_cpu = True
    elif args.device_check:  # on a GPU: the CUDA section and the checks; without one: the CPU section, them
        res, passed = device_check(Bench("cuda" if cuda else "cpu", args))
        out.update({"cuda": res} if cuda else res)
        args.json = args.json or os.path.join(HERE, "results", "device_check.json")
    else:
        if not args.skip_cpu:
            out.update(measure(Bench("cpu", args)))
        if cuda:
            out["cuda"] = measure(Bench("cuda", args))
        else:
            print("CUDA: not available, section skipped")
    out["wall_s"] = round(time.time() - t_start, 1)
    out["machine"]["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print_table(out)
    return passed


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.table:  # a saved run: no measuring
        print_table(*read_saved_runs(args.table))
        return
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)  # on a loaded machine, tiny ops wait on descheduled threads
    if not run(args):
        raise SystemExit("device check: tests/test_cuda.py failed or the distillation loss is not finite "
                         "(above)")


if __name__ == "__main__":
    run_script(main)  # user errors (a bad flag or file, --authors without their code): `error: ...`, exit 2
