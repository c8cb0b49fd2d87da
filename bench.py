"""
Measured cost of the mixture of minimal experts: MoE vs dense FFN per dispatch, the student's training
step, inference latency, the whole distillation step vs the teacher's forward, and peak memory.

Every headline is a ratio measured in one run with the variants interleaved (round-robin: each round
times the dense variant, then each MoE one, so a noisy shared machine slows them alike), after a
warm-up. Each round gives one ratio; a row reports their median and their min-max spread, and each
section the machine's load average before and after it (the spread says how far to trust a row; a
loaded machine shows in the load). Absolute times are context only. CPU always (fp32); CUDA when a
GPU is present (bf16 autocast, SDPA, --compile optional, CUDA events, max_memory_allocated, MFU).

    python bench.py                                # CPU: 3-4 min on 2 shared cores; prints the table last
    python bench.py --json runs/bench_cpu.json     # also writes the ratios, raw timings and the machine
    python bench.py --quick                        # a smoke test: tiny models, 1 thread, seconds (tests/test_bench.py)
    python bench.py --profile                      # + torch.profiler tables of one call of each variant
    python bench.py --table A.json [B.json]        # the table of a saved run (and how a second run differs)
    python bench.py --authors DIR --json PATH      # our distillation step vs the authors' (README: setup)

Rounds: --repeats (7) for the FFN and the 1x128 inference (x3), --heavy (3) for the steps of seconds
(student step, 32x128 inference, distillation). Warm-up: every variant is first run alone inside its
memory window (2 training steps, so that optimizer state exists, or 1 forward), then the light sections
add --warmup (1) interleaved rounds.

Threads: torch's default (all cores), reported. OMP_WAIT_POLICY defaults to PASSIVE here: on a shared,
oversubscribed machine libgomp's spinning threads steal the cores from the working ones, a penalty per
parallel op that hits the MoE's extra small ops hardest (its FFN measured 1.4-2.0x dense spinning,
~1.0x sleeping). `OMP_WAIT_POLICY=ACTIVE python bench.py` measures the spinning default.

Memory. CUDA: torch.cuda.max_memory_allocated above what was allocated before the variant was built.
CPU (Linux): the peak RSS (VmHWM, reset through /proc/self/clear_refs after a malloc_trim) above the
RSS just before the variant was built. Either way, what the variant adds: its weights, gradients,
optimizer state and peak activations; inference rows are activations only (weights listed apart), the
distillation row adds the student to the teacher already in memory.

Imports: minimoe (the models, built and initialised by `Bert`), and from train_distill the optimizer, the
optimizer step and the loss that a training step runs.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see the docstring

import argparse
import contextlib
import ctypes
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch

import minimoe as mm
from train_distill import NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, configure_optimizer, distill_loss, optimizer_step, \
    run_script, setup_runtime, writable_file

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--json", metavar="PATH", type=writable_file, help="also write the results as JSON here "
                    "(checked before any timing; its folder is made)")
parser.add_argument("--quick", action="store_true", help="a smoke test: tiny models, 1 thread, 2 rounds (seconds); "
                    "its ratios are not compared with the targets")
parser.add_argument("--repeats", type=POSITIVE_INT, default=7, help="timed rounds of the light sections")
parser.add_argument("--heavy", type=POSITIVE_INT, default=3, help="timed rounds of the sections of seconds per call")
parser.add_argument("--warmup", type=NONNEGATIVE_INT, default=1, help="interleaved warm-up rounds of the light sections")
parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's, all cores; --quick: 1)")
parser.add_argument("--compile", action="store_true", help="torch.compile the models in the CUDA section; on "
                    "CPU, add a distillation step whose student forward and loss are compiled")
parser.add_argument("--peak_tflops", type=POSITIVE, default=None, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
parser.add_argument("--skip_cpu", action="store_true", help="the CUDA section only (no top-level CPU ratios then)")
parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of one call of each variant")
parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of a saved --json run (no "
                    "measuring); with a second file, each row's median ratio in both and their relative difference")
parser.add_argument("--authors", metavar="DIR", help="only time our whole distillation step against the authors' "
                    "(a checkout of github.com/GeneZC/MiniMoE; their code imports transformers 4.x, so run this in "
                    "an environment that has it)")
parser.add_argument("--device_check", action="store_true", help="the one-command GPU check (< 8 min on "
                    "one GPU): the CUDA rows (eager bf16, a compiled FFN; tokens/s, MFU), the CUDA tests, "
                    "a short distillation, in --json (default results/device_check.json); no GPU: on CPU")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if args.threads or args.quick:
    torch.set_num_threads(args.threads or 1)  # on a loaded machine, tiny ops wait on descheduled OpenMP threads

HERE = os.path.dirname(os.path.abspath(__file__))  # the repository: tests/, results/
E = 4  # experts of every MiniMoE here (the paper's "1,4E")
T = 16 if args.quick else 128  # tokens per sequence
VOCAB = 2000 if args.quick else 30522  # BERT uncased WordPiece
SIZES = {  # batch sizes per device and section; 16 = the batch of train_distill.py's CPU demo
    "cpu": dict(ffn=64, student=16, infer=(32, 1), distill=32),
    "cuda": dict(ffn=64, student=128, infer=(32, 1), distill=128),
}
if args.quick:
    SIZES = {dev: dict(ffn=2, student=2, infer=(2, 1), distill=2) for dev in SIZES}
REPEATS, HEAVY, WARMUP = (2, 2, 0) if args.quick else (args.repeats, args.heavy, args.warmup)
TARGETS = dict(ffn=1.10, ffn_cuda=1.15, student=1.10, infer=1.05, infer_1=1.25, distill=1.45, sweep=1.0)
PEAK_BF16_TFLOPS = [  # dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets; first match wins
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0)]

# -----------------------------------------------------------------------------
# helpers: inputs, timing, memory


def fake_batch(B, T, device, seed):
    """Real-looking BERT inputs: [CLS] A [SEP] B [SEP] of random WordPiece ids; every other row is
    padded from a random length in [T/2, T) on (attention_mask 0, [PAD] = 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, VOCAB, (B, T), generator=g)
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


def timeit(fns, warmup, repeats, device="cpu"):
    """Seconds of each call of fns[name](), interleaved: every round calls each fn once, in order.
    CUDA: events around the call after a synchronize (host syncs inside the call count in its time)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            if device == "cuda":
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


def proc_status(key):
    """A /proc/self/status field (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def mem_reset(device):
    """Open a peak-memory window; returns its baseline in bytes."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that the baseline is live memory
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    return proc_status("VmRSS")


def mem_peak(device, base):
    """Peak MiB above `base` since mem_reset (None where the OS does not tell)."""
    if device == "cuda":
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    peak = proc_status("VmHWM")
    return None if peak is None or base is None else round((peak - base) / 2**20, 1)


def build(make, device, calls):
    """make() -> fn, built and called `calls` times alone inside a memory window (the variant's warm-up).
    Returns (fn, peak MiB)."""
    base = mem_reset(device)
    fn = make()
    for _ in range(calls):
        fn()
    return fn, mem_peak(device, base)


def median(xs):
    return statistics.median(xs)


def round_ratios(t, num, den, den_scale=1):
    """Per-round ratios t[num][i] / (den_scale * t[den][i]) of interleaved rounds."""
    return [a / (den_scale * b) for a, b in zip(t[num], t[den])]


def ratio_row(device, name, ratios, target):
    """A table row from the per-round ratios: their median (judged against the target) and spread."""
    r = median(ratios)
    return dict(device=device, name=name, ratio=r, min=min(ratios), max=max(ratios), rounds=len(ratios),
                target=target, ok=r <= target)


def load_avg():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def ffn_of(config):
    """The FFN of a one-layer `Bert` of this config, initialised as Bert initialises it (split experts)."""
    return mm.Bert(replace(config, num_layers=1, vocab_size=8, relation_head="layer")).layers[0].ffn


def cfg(name, **kw):
    """A preset; --quick shrinks it to 2 layers of width 64 (the teacher 128)."""
    if args.quick:
        w = 128 if name == "12L-768H" else 64
        kw = dict(vocab_size=VOCAB, num_layers=2, hidden_size=w, intermediate_size=4 * w, num_heads=4, **kw)
    return mm.BertConfig.preset(name, **kw)


def profile(fns, device, title):
    """torch.profiler table of one call of each fn, sorted by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, fn in fns.items():
        with torch_profile(activities=acts) as prof:
            fn()
            sync(device)
        print(f"\n== profile: {title} {name} ({device}), one call ==")
        print(prof.key_averages().table(sort_by=f"self_{'cuda' if device == 'cuda' else 'cpu'}_time_total", row_limit=15))


# -----------------------------------------------------------------------------
# the measurements, one device at a time


def measure(device):
    cuda = device == "cuda"
    S = SIZES[device]
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    compiled = torch.compile if cuda and args.compile else (lambda m: m)
    res, rows, mem = dict(timings_s={}, section_s={}, load_avg={}), [], {}
    t_section, load_section = time.time(), load_avg()

    def row(name, ratios, target):
        """Add a ratio_row to the table; returns its median ratio."""
        rows.append(ratio_row(device, name, ratios, target))
        return rows[-1]["ratio"]

    def section_done(name, fns=None):
        nonlocal t_section, load_section
        res["section_s"][name] = round(time.time() - t_section, 1)
        res["load_avg"][name] = [load_section, load_avg()]  # 1-minute load average before, after
        print(f"{device} {name}: {res['section_s'][name]:.0f} s, load {load_section} -> {res['load_avg'][name][1]}",
              flush=True)
        if args.profile and fns:
            profile(fns, device, name)
        t_section, load_section = time.time(), load_avg()

    def train_step(model, batch, teacher_qkv, compile_loss=False):
        """One optimizer step as in train_distill.py: relation loss + 0.01 load balance, backward, clip, AdamW
        (bf16 or fp32: a disabled GradScaler, as train_distill's). compile_loss: torch.compile the student's
        forward and the loss together (what inductor can fuse: dropout, GELU, the relation softmaxes)."""
        opt, scaler = configure_optimizer(model, lr=1e-4), torch.amp.GradScaler("cuda", enabled=False)
        raw, model = model, compiled(model)
        loss_fn = torch.compile(distill_loss) if compile_loss else distill_loss

        def step():
            qkv = teacher_qkv() if callable(teacher_qkv) else teacher_qkv
            with amp():
                loss = loss_fn(qkv, model, batch)[0]
            scaler.scale(loss).backward()
            optimizer_step(raw, opt, scaler, 1.0)
            scaler.update()
        return step

    # ---- 1. MoE FFN vs the dense FFN of one expert's size, forward + backward (training mode: router noise)
    scfg = cfg("3L-384H")  # the students' FFN: H = 384, I = 1536
    H, I, B = scfg.hidden_size, scfg.intermediate_size, S["ffn"]
    torch.manual_seed(args.seed)
    x = torch.randn(B, T, H, device=device, requires_grad=True)  # (B, T, H), the input needs its gradient too
    dy = torch.randn(B, T, H, device=device)  # upstream gradient
    mask = fake_batch(B, T, device, args.seed)["attention_mask"]  # (B, T)

    def ffn_step(m):
        def step():
            with amp():
                y, aux = m(x, mask)  # (B, T, H), MoEAux or None
                loss = (y.float() * dy).sum() + (0.01 * aux.loss if aux is not None else 0.0)
            loss.backward()
            x.grad = None
            m.zero_grad(set_to_none=True)
        return step

    def make_ffn(name):
        torch.manual_seed(args.seed)  # the same expert weights for every dispatch
        m = ffn_of(scfg) if name == "dense" else ffn_of(cfg("3L-384H", num_experts=E, dispatch=name))
        return ffn_step(compiled(m.to(device)))

    with amp():  # the grouped GEMM only where it runs as asked (on CUDA: bf16 on compute capability 9.x/10.x)
        auto = mm.resolve_dispatch("auto", x)
        dispatches = ["loop", "grouped"] if mm.grouped_mm_unfit(x) is None else ["loop"]
    fns = {}
    for name in ["dense"] + dispatches:
        fns[name], mem[f"ffn_{name}"] = build(lambda: make_ffn(name), device, calls=2)
    t = timeit(fns, WARMUP, REPEATS, device)
    ratios = {d: row(f"moe_ffn {d}{' (= auto)' if d == auto else ''} vs dense, {B}x{T} tok",
                     round_ratios(t, d, "dense"), TARGETS["ffn_cuda" if cuda else "ffn"]) for d in dispatches}
    if cuda and "grouped" in fns:
        row("moe_ffn grouped vs loop", round_ratios(t, "grouped", "loop"), 1.0)  # the grouped GEMM must win
    res["timings_s"]["ffn"] = t
    res["ffn"] = dict(tokens=B * T, H=H, I=I, E=E, ratios=ratios, auto_resolves_to=auto, dense_ms=1e3 * median(t["dense"]))
    res["moe_ffn_vs_dense"] = min(ratios.values())  # the best dispatch, as the target reads
    section_done("ffn", fns)
    del fns, x, dy

    # ---- 2. student training step: forward + backward + clip + AdamW on the real distillation loss
    B = S["student"]
    batch = fake_batch(B, T, device, args.seed)
    tq = tuple(torch.randn(B, T, cfg("12L-768H").hidden_size, device=device) for _ in range(3))  # a teacher's q, k, v
    res["student"] = {}
    for preset in ("3L-384H", "6L-384H"):
        fns = {}
        for name, n_exp in (("dense", 1), ("moe", E)):
            torch.manual_seed(args.seed)
            fns[name], mem[f"student_{preset}_{name}"] = build(
                lambda: train_step(mm.Bert(cfg(preset, num_experts=n_exp, relation_head="extra")).to(device).train(),
                                   batch, tq), device, calls=2)  # the same relation head: the experts' cost alone
        t = timeit(fns, 0, HEAVY, device)
        r = row(f"student_step {preset} E={E} vs dense, {B}x{T}", round_ratios(t, "moe", "dense"), TARGETS["student"])
        flops = 3 * B * mm.count_flops(cfg(preset), T)["flops_per_sequence"]  # forward + backward, model FLOPs
        res["timings_s"][f"student_{preset}"] = t
        res["student"][preset] = dict(ratio=r, batch=B, dense_ms=1e3 * median(t["dense"]),
                                      moe_ms=1e3 * median(t["moe"]), dense_tflops=flops / median(t["dense"]) / 1e12)
    res["student_step_vs_dense"] = max(v["ratio"] for v in res["student"].values())  # the worse of the two
    section_done("student", fns)
    del fns

    # ---- 3. inference latency (eval mode: no dropout, no router noise) and throughput. MoE variants: auto
    # dispatch, and for 3L the experts compressed to rank-64 factors (compress_experts, per expert; the
    # downstream study's 1,4E r64)
    rank = 16 if args.quick else 64
    res["inference"] = {}
    for preset in ("3L-384H", "6L-384H"):
        models = {}
        for name, n_exp in (("dense", 1), ("moe", E)):
            torch.manual_seed(args.seed)
            models[name], mem[f"weights_{preset}_{name}"] = build(
                lambda: compiled(mm.Bert(cfg(preset, num_experts=n_exp, relation_head="layer"))
                                 .to(device).eval()), device, calls=0)  # as deployed: no extra relation head
        if preset == "3L-384H":
            models[f"moe_r{rank}"], mem[f"weights_{preset}_moe_r{rank}"] = build(
                lambda: mm.compress_experts(models["moe"], rank, "per_expert").eval(), device, calls=0)
        for B in S["infer"]:
            batch = fake_batch(B, T, device, args.seed)
            fns = {}
            for name, model in models.items():
                def forward(model=model):
                    with torch.inference_mode(), amp():
                        return model(**batch)
                fns[name], mem[f"infer_{preset}_{B}x{T}_{name}"] = build(lambda: forward, device, calls=1)
            t = timeit(fns, WARMUP if B == 1 else 0, REPEATS * 3 if B == 1 else HEAVY, device)
            target = TARGETS["infer_1" if B == 1 else "infer"]
            r = row(f"inference {preset} E={E} vs dense, {B}x{T}", round_ratios(t, "moe", "dense"), target)
            if f"moe_r{rank}" in fns:
                row(f"inference {preset} E={E} rank-{rank} experts vs E={E}, {B}x{T}",
                    round_ratios(t, f"moe_r{rank}", "moe"), 1.0)
            res["timings_s"][f"infer_{preset}_{B}x{T}"] = t
            res["inference"][f"{preset} {B}x{T}"] = dict(
                ratio=r, **{f"{name}_ms": 1e3 * median(ts) for name, ts in t.items()},
                dense_seq_per_s=B / median(t["dense"]), moe_seq_per_s=B / median(t["moe"]))
    res["inference_vs_dense"] = max(v["ratio"] for v in res["inference"].values())  # the worst case
    section_done("inference", fns)
    del models, fns

    # ---- 4. the whole distillation step vs the teacher's forward alone
    B = S["distill"]
    batch = fake_batch(B, T, device, args.seed)
    tcfg, scfg = cfg("12L-768H"), cfg("6L-384H", num_experts=E)
    torch.manual_seed(args.seed)
    teacher = compiled(mm.Bert(tcfg).to(device).eval().requires_grad_(False))

    def teacher_forward():
        with torch.no_grad(), amp():
            return teacher(**batch).qkv  # the last layer's q, k, v

    fns = {}
    fns["teacher_forward"], mem["teacher_12L-768H_forward"] = build(lambda: teacher_forward, device, calls=1)
    base = mem_reset(device)  # this window stays open over the timed rounds: 1 step alone, then >= 2 more
    fns["distill_step"] = train_step(mm.Bert(scfg).to(device).train(), batch, teacher_forward)
    fns["distill_step"]()
    mem[f"distill_step_6L-384H_E{E}_over_teacher"] = mem_peak(device, base)
    # a sweep (train_distill --students): N students share each teacher forward; vs N runs of their own
    shared, N = {}, 2
    sweep_steps = [train_step(mm.Bert(scfg).to(device).train(), batch, lambda: shared["qkv"]) for _ in range(N)]

    def sweep_step():
        shared["qkv"] = teacher_forward()
        for step in sweep_steps:
            step()
    fns[f"sweep_{N}_students"], mem[f"sweep_{N}_students_over_one"] = build(lambda: sweep_step, device, calls=1)
    if args.compile and not cuda:  # on CUDA --compile compiles every model already
        t0 = time.time()
        fns["distill_step_compiled"] = train_step(mm.Bert(scfg).to(device).train(), batch, teacher_forward,
                                                  compile_loss=True)
        for _ in range(5):  # compiles, then recompiles until the experts' token counts are dynamic
            fns["distill_step_compiled"]()
        res["compile_s"] = round(time.time() - t0, 1)
    t = timeit(fns, 0, HEAVY, device)
    tf, ts = median(t["teacher_forward"]), median(t["distill_step"])
    f_teacher = B * mm.count_flops(tcfg, T)["flops_per_sequence"]
    f_distill = f_teacher + 3 * B * mm.count_flops(scfg, T)["flops_per_sequence"]  # model FLOPs; relation loss not counted
    res["timings_s"]["distill"] = t
    res["distill"] = dict(batch=B, teacher_forward_ms=1e3 * tf, distill_step_ms=1e3 * ts, flop_ratio=f_distill / f_teacher,
                          teacher_forward_tflops=f_teacher / tf / 1e12, distill_step_tflops=f_distill / ts / 1e12)
    if cuda:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
        res["peak_bf16_tflops"] = peak
        if peak:
            res["distill"]["teacher_forward_mfu"] = res["distill"]["teacher_forward_tflops"] / peak
            res["distill"]["distill_step_mfu"] = res["distill"]["distill_step_tflops"] / peak
    res["distill_vs_teacher_forward"] = row(f"distill_step (12L-768H teacher + 6L-384H E={E}) vs teacher fwd, {B}x{T}",
                                            round_ratios(t, "distill_step", "teacher_forward"), TARGETS["distill"])
    if "distill_step_compiled" in fns:
        row(f"distill_step, student fwd + loss compiled, vs teacher fwd, {B}x{T}",
            round_ratios(t, "distill_step_compiled", "teacher_forward"), TARGETS["distill"])
    sweep = row(f"sweep: {N} students on one teacher fwd vs {N} runs, {B}x{T}",
                round_ratios(t, f"sweep_{N}_students", "distill_step", den_scale=N), TARGETS["sweep"])
    res["sweep"] = dict(students=N, ratio=sweep, saving=1 - sweep, step_ms=1e3 * median(t[f"sweep_{N}_students"]))
    section_done("distill", fns)
    del fns, teacher, sweep_steps, shared

    # ---- 5. the relation loss alone, forward + backward: readable vs fused (ChunkedRelationKL, 8 heads a block)
    B = S["distill"]
    token_mask = fake_batch(B, T, device, args.seed)["attention_mask"]  # (B, T)
    torch.manual_seed(args.seed)
    teacher_qkv = tuple(torch.randn(B, T, cfg("12L-768H").hidden_size, device=device) for _ in range(3))
    student_qkv = tuple(torch.randn(B, T, cfg("6L-384H").hidden_size, device=device, requires_grad=True)
                        for _ in range(3))

    def relation_step(fused):
        def step():
            mm.relation_loss(teacher_qkv, student_qkv, token_mask, 32, fused=fused).backward()
            for x in student_qkv:
                x.grad = None
        return step

    fns = {}
    for name, fused in (("readable", False), ("fused", True)):
        fns[name], mem[f"relation_loss_{name}"] = build(lambda: relation_step(fused), device, calls=1)
    t = timeit(fns, WARMUP, HEAVY, device)
    r = row(f"relation_loss fused vs readable, fwd+bwd {B}x{T}, R=32", round_ratios(t, "fused", "readable"), 1.0)
    res["timings_s"]["relation_loss"] = t
    res["relation_loss"] = dict(batch=B, relation_heads=32, ratio=r, readable_ms=1e3 * median(t["readable"]),
                                fused_ms=1e3 * median(t["fused"]), readable_mib=mem["relation_loss_readable"],
                                fused_mib=mem["relation_loss_fused"])
    section_done("relation_loss", fns)
    del fns

    res["peak_memory_mib"], res["rows"] = mem, rows
    return res


def authors_side_by_side(repo):
    """Our whole distillation step against the authors' (their HF-style classes, imported from a checkout of
    their repository at `repo`, never copied): the same shapes as the original comparison, a 6L-384H teacher
    and a 3L-384H 1,4E student at 32x128 with padding, fp32, one process, rounds interleaved. Each side runs
    its own step as its training script does: theirs BertMiniLM / MoEBertMiniLM.loss_fn (relations from an
    extra Q/K/V head, the teacher's in all its layers), loss.item(), clip 5, transformers.AdamW; ours
    train_distill's distill_loss, optimizer_step (clip 1) and torch's AdamW. Random weights on both sides."""
    if not os.path.isdir(repo):
        raise SystemExit(f"--authors {repo}: no such directory (a checkout of github.com/GeneZC/MiniMoE)")
    sys.path.insert(0, os.path.abspath(repo))
    try:
        import transformers
        from models.bert_minilm import BertMiniLM
        from models.moebert_minilm import MoEBertMiniLM
    except ImportError as e:
        raise SystemExit(f"--authors {repo}: cannot import the authors' models ({e}). Give a checkout of "
                         "github.com/GeneZC/MiniMoE and run in an environment with transformers 4.x (4.23 installs "
                         "on Python 3.11); see the README") from None
    B, L_t, L_s, H, R = (2, 2, 1, 48, 4) if args.quick else (32, 6, 3, 384, 32)
    torch.manual_seed(args.seed)
    ids, mask, types = (fake_batch(B, T, "cpu", args.seed)[k] for k in ("input_ids", "attention_mask", "token_type_ids"))

    def their_config(layers, moe=None):  # the edits their scripts make to a bert-base config
        c = transformers.BertConfig(num_hidden_layers=layers, hidden_size=H, num_attention_heads=12,
                                    intermediate_size=4 * H * (4 if moe else 1), vocab_size=VOCAB)
        c.num_relation_heads, c.attention_head_size = R, H // 12
        return c
    t_theirs = BertMiniLM(their_config(L_t)).eval()
    s_theirs = MoEBertMiniLM(their_config(L_s, moe="1,4"))
    s_theirs.bert.moefy("1,4")  # 4 experts of 4H neurons, split from one wide FFN as in their script
    s_theirs.config.moe = "1,4"
    no_decay = ("bias", "LayerNorm.weight")
    groups = [dict(params=[p for n, p in s_theirs.named_parameters() if not any(k in n for k in no_decay)],
                   weight_decay=0.01),
              dict(params=[p for n, p in s_theirs.named_parameters() if any(k in n for k in no_decay)],
                   weight_decay=0.0)]
    opt_theirs = transformers.AdamW(groups, lr=3e-4)
    their_batch = [ids, mask.bool(), types]

    def theirs():
        s_theirs.train()
        with torch.no_grad():
            t_out = t_theirs(their_batch)
        loss = MoEBertMiniLM.loss_fn(t_out, s_theirs(their_batch))
        loss.item()  # their loop logs every step's loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_theirs.parameters(), 5.0)
        opt_theirs.step()
        opt_theirs.zero_grad()

    def our_cfg(layers, experts=1, relation_head="layer"):
        return mm.BertConfig(vocab_size=VOCAB, num_layers=layers, hidden_size=H, intermediate_size=4 * H,
                             num_heads=12, num_experts=experts, relation_head=relation_head)
    t_ours = mm.Bert(our_cfg(L_t)).eval().requires_grad_(False)
    s_ours = mm.Bert(our_cfg(L_s, experts=E, relation_head="extra")).train()
    opt_ours, scaler = configure_optimizer(s_ours, lr=3e-4), torch.amp.GradScaler("cuda", enabled=False)
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)

    def ours():
        with torch.no_grad():
            qkv = t_ours(**batch).qkv
        loss = distill_loss(qkv, s_ours, batch, num_relation_heads=R)[0]
        loss.backward()
        optimizer_step(s_ours, opt_ours, scaler, 1.0)

    fns = {"theirs": theirs, "ours": ours}
    for fn in fns.values():  # warm-up: optimizer state exists
        fn(), fn()
    t = timeit(fns, 0, 2 if args.quick else max(HEAVY, 5))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return dict(rows=[ratio_row("cpu", f"authors' code: our distill step vs theirs, {L_t}L-{H}H teacher + {L_s}L-{H}H "
                                f"E={E}, {B}x{T}", round_ratios(t, "ours", "theirs"), 0.30)],
                timings_s=t, transformers=transformers.__version__, ours_ms=1e3 * median(t["ours"]),
                theirs_ms=1e3 * median(t["theirs"]), student_params=dict(ours=n(s_ours), theirs=n(s_theirs)))


def machine():
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    m = dict(cpu=cpu, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
             omp_wait_policy=os.environ["OMP_WAIT_POLICY"], torch=torch.__version__,
             python=platform.python_version(), load_avg_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None)
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
    """The summary and the table of one run's JSON; with `other` (a second run's JSON), each row's median
    there and the relative difference of the two medians."""
    m, rows = out["machine"], []
    print(f"\ntorch {m['torch']}, {m['threads']} threads (OMP_WAIT_POLICY={m['omp_wait_policy']}), {m['cpu']}"
          + (f", GPU {m['gpu']}" if "gpu" in m else "")
          + f", load avg {m['load_avg_at_start'][0]:.1f} -> {m['load_avg_at_end'][0]:.1f}; {out['wall_s']:.0f} s")
    if "authors" in out:
        a = out["authors"]
        rows += a["rows"]
        print(f"authors' code (transformers {a['transformers']}): theirs {a['theirs_ms']:.0f} ms, ours "
              f"{a['ours_ms']:.0f} ms a step; student parameters {a['student_params']}")
    for dev, res in (("cpu", out if "peak_memory_mib" in out else None), ("cuda", out.get("cuda"))):
        if res is None:
            continue
        rows += res["rows"]
        print(f"{dev} peak memory added, MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in res["peak_memory_mib"].items()
                                                           if v is not None))
        print(f"{dev} load average before -> after each section: "
              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in res.get("load_avg", {}).items()))
        print(f"{dev} inference seq/s dense/MoE: " + ", ".join(f"{k} {v['dense_seq_per_s']:.1f}/{v['moe_seq_per_s']:.1f}"
                                                             for k, v in res["inference"].items()))
        d = res["distill"]
        mfu = f", MFU {d['teacher_forward_mfu']:.1%} / {d['distill_step_mfu']:.1%}" if "distill_step_mfu" in d else ""
        print(f"{dev} teacher forward {d['teacher_forward_ms']:.0f} ms ({d['teacher_forward_tflops']:.3f} TFLOP/s), "
              f"distillation step {d['distill_step_ms']:.0f} ms ({d['distill_step_tflops']:.3f} TFLOP/s){mfu}")
    if not rows:
        raise SystemExit("nothing measured (--skip_cpu without a GPU)")
    quick = out["args"]["quick"]
    if quick:
        print("\n--quick: a smoke test on tiny models (2 layers, width 64, 16 tokens); the ratios say nothing about "
              "the targets, which are for the real sizes (python bench.py)")
    again = {(r["device"], r["name"]): r for sec in (other, other.get("cuda"), other.get("authors")) if sec
             for r in sec.get("rows", [])} if other else {}
    w = max(len(r["device"] + r["name"]) for r in rows) + 1
    print(f"\n{'name':<{w}} {'ratio':>7} {'min-max':>13} {'target':>7}  result" + ("   run 2  diff" if other else "")
          + "  (per-round ratios of interleaved rounds: median, spread)")
    for r in rows:
        result = "smoke" if quick else "pass" if r["ok"] else "MISS"
        spread = f"{r['min']:.2f}-{r['max']:.2f}" if "min" in r else ""
        line = f"{r['device'] + ' ' + r['name']:<{w}} {r['ratio']:>6.3f}x {spread:>13} {r['target']:>6.2f}x  {result:<6}"
        if (r["device"], r["name"]) in again:
            r2 = again[(r["device"], r["name"])]["ratio"]
            line += f" {r2:>6.3f}x {(r2 - r['ratio']) / r['ratio']:+6.1%}"
        print(line.rstrip())


# -----------------------------------------------------------------------------
# the device check: what a person with a GPU runs in one command (--quick: the same at test size, on CPU)


def compiled_ffn_row(device, amp):
    """Section 1's FFN compiled, MoE (auto dispatch) vs dense, forward + backward: (row, tokens/s of each).
    Inductor on CUDA; aot_eager on CPU (the trace without C++ codegen, to keep a CPU check to seconds)."""
    scfg, B = cfg("3L-384H"), SIZES[device]["ffn"]
    x = torch.randn(B, T, scfg.hidden_size, device=device, requires_grad=True)  # (B, T, H)
    mask = fake_batch(B, T, device, args.seed)["attention_mask"]  # (B, T)
    backend = "inductor" if device == "cuda" else "aot_eager"

    def make(config):
        torch.manual_seed(args.seed)
        m = torch.compile(ffn_of(config).to(device), backend=backend)

        def step():
            with amp():
                y, aux = m(x, mask)  # (B, T, H), MoEAux or None
                loss = y.float().square().mean() + (0.01 * aux.loss if aux is not None else 0.0)
            loss.backward()
        return step
    fns = {name: build(lambda: make(replace(scfg, num_experts=n)), device, calls=5)[0]  # the loop: recompiles
           for name, n in (("dense", 1), ("moe", E))}  # until its experts' token counts are dynamic
    t = timeit(fns, WARMUP, REPEATS, device)
    with amp():
        auto = mm.resolve_dispatch("auto", x)
    row = ratio_row(device, f"moe_ffn compiled ({auto}) vs dense compiled, {B}x{T} tok",
                    round_ratios(t, "moe", "dense"), TARGETS["ffn_cuda" if device == "cuda" else "ffn"])
    return row, {name: B * T / median(ts) for name, ts in t.items()}


def short_distillation(steps):
    """`steps` optimizer steps as train_distill.py takes them (its runtime and precision, distill_loss,
    optimizer_step), from a random-init teacher of the default teacher's shape (12L-768H: the 90 MB
    checkpoint need not travel) into a 6L-384H 1,4E student, on synthetic WordPiece batches (no corpus, no
    `datasets`)."""
    rt = setup_runtime(args.seed)  # bf16 autocast on a CUDA device that has it, else fp32
    B = SIZES["cuda" if rt.device.type == "cuda" else "cpu"]["distill"]
    teacher = mm.Bert(cfg("12L-768H")).to(rt.device).eval().requires_grad_(False)
    student = mm.Bert(cfg("6L-384H", num_experts=E)).to(rt.device).train()
    opt = configure_optimizer(student, lr=3e-4)
    batches = [fake_batch(B, T, rt.device, args.seed + i) for i in range(4)]
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
                last_loss=losses[-1], tokens_per_s=(steps - 1) * B * T / (time.time() - t0))


def device_check():
    """The CUDA rows of measure() (eager, bf16 autocast: the FFN per dispatch, student steps, inference, the
    distillation step with MFU), the compiled FFN, tests/test_cuda.py and short_distillation, in one JSON.
    Returns the run's dict and whether everything passed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda_amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    amp = cuda_amp if device == "cuda" else contextlib.nullcontext
    res = measure(device)
    row, ffn_compiled = compiled_ffn_row(device, amp)
    res["rows"].append(row)
    pytest = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    tests = subprocess.run(pytest, cwd=HERE, capture_output=True, text=True)
    lines = (tests.stdout + tests.stderr).strip().splitlines() or [""]
    if tests.returncode:
        print("\n".join(lines[-40:]))
    distill = short_distillation(4 if args.quick else 100)
    d = res["distill"]
    tok = dict(ffn={k: res["ffn"]["tokens"] / median(v) for k, v in res["timings_s"]["ffn"].items()},
               ffn_compiled=ffn_compiled, distill_step=d["batch"] * T / d["distill_step_ms"] * 1e3,
               short_distillation=distill["tokens_per_s"])
    res["device_check"] = dict(tokens_per_s=tok, tests=dict(returncode=tests.returncode, summary=lines[-1]),
                               short_distillation=distill, peak_bf16_tflops=res.get("peak_bf16_tflops"))
    print(f"\n{device} tokens/s: " + ", ".join(f"ffn {k} {v:,.0f}" for k, v in tok["ffn"].items())
          + ", " + ", ".join(f"ffn compiled {k} {v:,.0f}" for k, v in ffn_compiled.items())
          + f", distill step {tok['distill_step']:,.0f}")
    print(f"tests/test_cuda.py: {lines[-1]} (exit {tests.returncode})")
    d = distill
    print(f"short distillation ({d['steps']} steps, {d['precision']}): loss {d['first_loss']:.4f} -> "
          f"{d['last_loss']:.4f}, {d['tokens_per_s']:,.0f} tokens/s")
    ok = tests.returncode == 0 and all(math.isfinite(distill[k]) for k in ("first_loss", "last_loss"))
    return res, ok


# -----------------------------------------------------------------------------
# run: CPU, then CUDA when present; the JSON; the table last

if args.table:  # user errors (here and in --authors): `error: ...`, exit 2, as the other scripts
    run_script(lambda: print_table(*read_saved_runs(args.table)))
    raise SystemExit(0)
t_start = time.time()
out = dict(machine=machine(), args=vars(args))
if args.authors:
    run_script(lambda: out.update(authors=authors_side_by_side(args.authors)))
    args.skip_cpu = True
passed = True
if args.device_check:  # on a GPU: the CUDA section and the checks; without one: the CPU section and them
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    res, passed = device_check()
    out.update({"cuda": res} if torch.cuda.is_available() else {**res, "cuda": None})
    args.json = args.json or os.path.join(HERE, "results", "device_check.json")
elif not args.skip_cpu:
    out.update(measure("cpu"))
if torch.cuda.is_available() and not args.authors and not args.device_check:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out["cuda"] = measure("cuda")
else:
    out["cuda"] = None
    if not args.authors:
        print("CUDA: not available, section skipped")
out["wall_s"] = round(time.time() - t_start, 1)
out["machine"]["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
print_table(out)
if not passed:
    raise SystemExit("device check: tests/test_cuda.py failed or the distillation loss is not finite (above)")
