"""
Keeping runs safe: what train_distill.py, finetune.py, eval.py and bench.py share that is not the method.
A reader learning MiniMoE can skip this file. In order: the `error:` handler and argparse types (a user error
is one line naming the flag or file); the runtime and the optimizer step; one run per --out_dir (a lock);
checkpoints written atomically with a sha256 beside them; what a resume puts back (RNG states) and cuts back
(log files); and the SIGTERM handling that ends worker processes with us.

Imports run one way: minimoe <- runkeeping <- train_distill <- finetune <- eval (bench.py beside eval.py).
"""
import argparse
import atexit
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

import minimoe


def warn(msg):
    print(f"[{Path(sys.argv[0]).stem or 'minimoe'}] {msg}", file=sys.stderr, flush=True)


def hub_reachable(timeout=3.0):
    """Can we open a connection to the Hugging Face Hub? (Offline, load_dataset itself retries for long.)
    Behind an HTTPS proxy a direct connection says nothing: let the proxy decide."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# -----------------------------------------------------------------------------
# The command line: the `error:` handler and argument types


def run_script(main):
    """The scripts' entry point. A user error (a bad flag, input file or checkpoint, a full disk: a SystemExit
    with a message, ValueError, OSError or ImportError) prints `error: <message>` and exits with status 2; any
    other exception is a bug and keeps its traceback, as every error does with --debug."""
    try:
        main()
    except (SystemExit, ValueError, OSError, ImportError) as e:
        message = e.code if isinstance(e, SystemExit) else str(e)
        if not isinstance(message, str) or "--debug" in sys.argv:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def number(kind=int, low=None, high=None, above=None):
    """An argparse type: a finite int or float with low <= x <= high, or x > above; argparse shows a
    refusal as "argument --batch_size: must be an integer >= 1, got '0'"."""
    what = "an integer" if kind is int else "a number"
    lower = f">= {low}" if low is not None else f"> {above}" if above is not None else ""
    bound = " and ".join(b for b in (lower, f"<= {high}" if high is not None else "") if b)

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        too_low = (low is not None and x < low) or (above is not None and x <= above)
        if not math.isfinite(x) or too_low or (high is not None and x > high):
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
        return x
    return parse


def writable_file(text):
    """An argparse type: a path a file can be written to, its folder made if missing. A --json flag checked
    at parse time fails at once, not after minutes of work."""
    folder = Path(text).resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create {folder} ({e.strerror})") from None
    if Path(text).is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"not a writable file path: {text!r}")
    return text


POSITIVE_INT, NONNEGATIVE_INT = number(int, low=1), number(int, low=0)
POSITIVE, NONNEGATIVE, FRACTION = number(float, above=0), number(float, low=0), number(float, low=0, high=1)


# -----------------------------------------------------------------------------
# Runtime, optimizer and its step, schedule, padding (both training scripts and bench.py use them)


class Runtime(NamedTuple):
    device: torch.device
    is_ddp: bool  # launched by torchrun with WORLD_SIZE > 1
    rank: int
    local_rank: int
    world_size: int
    is_master: bool  # rank 0: logs, evaluates and saves
    amp_dtype: Optional[torch.dtype]  # autocast dtype, None = fp32
    scaler: torch.amp.GradScaler  # enabled for fp16 only; otherwise its calls pass through

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(seed: int, precision: str = "auto") -> Runtime:
    """Device, DDP (under torchrun), precision and seeds (seed + rank), like nanoGPT. precision "auto" is
    bf16 autocast on CUDA when supported, else fp32; "fp16" adds a GradScaler (CUDA only)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_ddp = world_size > 1
    rank, local_rank = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])) if is_ddp else (0, 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif torch.backends.mps.is_available() and not is_ddp:
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if is_ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere and newer
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 (with GradScaler) needs CUDA; use bf16 or fp32 on this device")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    return Runtime(device, is_ddp, rank, local_rank, world_size, rank == 0, amp_dtype, scaler)


def configure_optimizer(model, lr, weight_decay=0.01):
    """AdamW with weight decay on weight matrices only, as in BERT and the MiniMoE code: none on biases (the
    experts' stacked 2-D b1/b2/bqkv/bo too) and LayerNorm weights. betas and eps: the original's HF AdamW."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not minimoe.is_bias(name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cuda", "cpu") for p in decay + no_decay)  # one kernel per step
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, fused=fused or None)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip to grad_clip, step and zero the gradients; returns the gradient norm before
    clipping (None with grad_clip 0: no clipping). scaler.update() is the caller's, once per step: one
    scaler may serve several optimizers (the students of train_distill)."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    scaler.step(optimizer)  # skipped when an fp16 gradient is inf/NaN
    optimizer.zero_grad(set_to_none=True)
    return norm


def lr_lambda(step, total_steps, warmup_steps):
    """Multiplier of the peak lr for LambdaLR: linear warmup from 0, then linear decay to 0 at
    total_steps (HF's get_linear_schedule_with_warmup, used by the MiniMoE code)."""
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def pad_batch(ids, types, pad_id, T):
    """Lists of token ids and token type ids -> (B, T) tensors input_ids, token_type_ids and attention_mask
    (1 = real token), padded at the end."""
    out = {"input_ids": torch.full((len(ids), T), pad_id, dtype=torch.long),  # (B, T)
           "token_type_ids": torch.zeros(len(ids), T, dtype=torch.long),  # (B, T)
           "attention_mask": torch.zeros(len(ids), T, dtype=torch.long)}  # (B, T)
    for i, (x, t) in enumerate(zip(ids, types)):
        out["input_ids"][i, :len(x)] = torch.tensor(x)
        out["token_type_ids"][i, :len(t)] = torch.tensor(t)
        out["attention_mask"][i, :len(x)] = 1
    return out


# -----------------------------------------------------------------------------
# One run per directory: a kernel lock (filelock), which dies with its process


class DirectoryInUse(SystemExit):
    """lock_out_dir's refusal when another process holds the directory's lock."""


_HELD = {}  # lock file -> filelock.FileLock this process holds (a second main() in one process reuses it)


def lock_out_dir(out_dir, what="run"):
    """Create out_dir (an error now, not after hours of tokenising, if it cannot be written) and take its
    lock `.lock`, an flock: a second run on the same directory is refused, and a lock whose process died
    (a kill -9) is simply free. Returns the lock file's path; release_lock, at exit or earlier, removes it
    (eval.py reads a .lock left behind as a run cut off)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"--out_dir {out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out_dir {out_dir}: cannot be created ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SystemExit(f"--out_dir {out_dir}: not writable")
    path = out_dir / ".lock"
    key = str(path.resolve())
    if key in _HELD and path.exists():  # an earlier main() of this process holds it
        return path
    import filelock  # here, not at the top: filelock's fork handlers deadlock datasets' forked readers
    lock = filelock.FileLock(path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        try:
            owner = json.loads(path.read_text())
            holder = f"pid {owner['pid']} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):  # between its lock and its write
            holder = "a process"
        raise DirectoryInUse(f"{out_dir} is in use by another {what} ({holder}, lock file {path}); "
                             "wait for it, or use another --out_dir") from None
    _HELD[key] = lock
    atexit.register(release_lock, path)
    # into the locked file itself (filelock never truncates it): who holds it, for the refusal's message
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return path


def release_lock(path):
    """Remove this process's lock file, then release the lock (a finished run leaves no .lock)."""
    lock = _HELD.pop(str(Path(path).resolve()), None)
    if lock is not None:
        Path(path).unlink(missing_ok=True)
        lock.release()


def remove_stale_temp_files(out_dir):
    """Temporary files that a killed or failed save (minimoe.atomic_write: .NAME.tmpPID) left anywhere in a
    run's directory: checkpoints, results, every student's or a finetuned model's files (the directory's lock
    is ours, so no other process writes there); and checksums whose checkpoint is gone."""
    out_dir = Path(out_dir)
    temp = [f for f in out_dir.rglob(".*.tmp*") if re.fullmatch(r"\..+\.tmp\d+", f.name) and f.is_file()]
    orphans = [f for f in out_dir.glob("checkpoints/step_*.pt.sha256") if not f.with_suffix("").exists()]
    for f in temp + orphans:
        warn(f"removing {f}, left by an interrupted save")
        f.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Checkpoints: atomic saves with a sha256 beside them, read back checked


def atomic_save(obj, path, checksum=False):
    """torch.save through minimoe.atomic_write (the old file or the whole new one, never half of one).
    checksum: also write PATH.sha256 (`sha256sum -c` reads it), before the rename, so that every checkpoint
    in place has one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f):
        torch.save(obj, f)
        if checksum:
            f.flush()
            minimoe.atomic_write(f"{path}.sha256", f"{sha256_file(f.name)}  {path.name}\n")
    minimoe.atomic_write(path, write)


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_checkpoint(path):
    """torch.load of a training checkpoint, checked first against its .sha256 (when it has one), and
    its students' weights checked to be finite: a ValueError naming the file otherwise."""
    path, sums = Path(path), Path(f"{path}.sha256")
    if sums.exists():
        want = (sums.read_text(errors="replace").split() or [""])[0]
        if not re.fullmatch(r"[0-9a-f]{64}", want):
            raise ValueError(f"{sums}: empty or not a sha256 checksum file (damaged)")
        if sha256_file(path) != want:
            raise ValueError(f"{path}: the sha256 checksum does not match {sums.name} "
                             "(the file is damaged or truncated)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        students = ckpt["students"]  # {name: {config, model, optimizer, scheduler}}
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a checkpoint "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    for name, st in students.items():
        if bad := minimoe.nonfinite_tensor(st["model"]):
            raise ValueError(f"{path}: tensor {bad!r} of student {name} is not finite (NaN or inf)")
    return ckpt


def find_resume_checkpoint(ckpt_dir, resume):
    """(path, checkpoint) for --resume: the file given, or ("latest") the newest intact one of ckpt_dir,
    a damaged newer one reported and skipped; (None, None) when ckpt_dir has no checkpoint."""
    if resume != "latest":
        return Path(resume), load_checkpoint(resume)
    found = checkpoints(ckpt_dir)
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            warn(f"{e}: falling back to the previous checkpoint")
    if found:
        raise SystemExit(f"--resume: none of the {len(found)} checkpoints in {ckpt_dir} is intact; "
                         "start a new run with --overwrite (or in another --out_dir)")
    return None, None


def checkpoints(ckpt_dir):
    """step_*.pt files of a run, oldest first."""
    return sorted(Path(ckpt_dir).glob("step_*.pt"))


def remove_checkpoint(path):
    Path(path).unlink(missing_ok=True)
    Path(f"{path}.sha256").unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# What a resume puts back (RNG states, as plain types that torch.load(weights_only=True) reads back) and
# cuts back (the log files, written whole and atomically)


def rng_state():
    """This process's RNG states: python, numpy, torch (CPU and CUDA)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    key = np.array(state["numpy"]["state"]["key"], dtype=np.uint32)
    np.random.set_state({**state["numpy"], "state": {**state["numpy"]["state"], "key": key}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_rng_state():
    """The torch generators that dropout and router noise draw from (CPU, and CUDA when present)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_torch_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json(path, obj):
    minimoe.atomic_write(path, json.dumps(obj, indent=1))


def truncate_log(path, step):
    """Drop log.jsonl records after `step` (a resumed run logs those steps again), and a last line cut
    short by a kill."""
    def before(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and before(ln)]
        minimoe.atomic_write(path, "".join(ln + "\n" for ln in keep))


def resumed_results(path, fresh, step):
    """results.json of the run being resumed, cut back to the checkpoint's step."""
    if not path.exists():
        return fresh
    try:
        old = json.loads(path.read_text())
    except ValueError:  # damaged (an interrupted copy, a full disk): start it afresh
        old = None
    if not isinstance(old, dict):
        warn(f"{path}: not valid JSON, so its held-out evaluations up to step {step} are dropped")
        return fresh
    for k, st in old.get("students", {}).items():
        if k in fresh["students"]:
            fresh["students"][k]["heldout"] = [x for x in st["heldout"] if x[0] <= step]
            fresh["students"][k]["expert_load"] = [x for x in st["expert_load"] if x[0] <= step]
    fresh["tok_per_s"] = [x for x in old.get("tok_per_s", []) if x[0] <= step]
    return fresh


# -----------------------------------------------------------------------------
# A plain `kill` ends the worker processes with us


def workers_die_with_us(fn):
    """Decorator: a plain `kill` (SIGTERM: a scheduler, `timeout`) of this process while `fn` runs ends the
    worker processes it started (datasets' map and generator pools) and then this process, rather than
    leaving the workers running with no parent. A forked worker gets the default action back
    (sigterm_kills_children); the next start removes the partial build."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
            return fn(*args, **kwargs)

        def on_sigterm(signum, frame):
            # Exit here, not by raising SystemExit: an exception raised while Python runs an at-fork callback
            # (logging has one, and the pools fork often) is printed and dropped, and the build would go on.
            # Nor by calling into multiprocessing, whose locks the interrupted code may hold: the workers
            # die with this process (sigterm_kills_children).
            warn("stopped by SIGTERM; the worker processes were ended")
            os._exit(128 + signum)
        on_sigterm.ours = True
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return wrapped


def sigterm_kills_children():
    """In a forked worker of workers_die_with_us: SIGTERM's default action instead of the handler (a Python
    handler runs only when the interpreter gets control, so a worker blocked in a lock a thread held at the
    fork would ignore the pool's terminate() and its parent would wait for it forever), and, on Linux, death
    with the parent (PR_SET_PDEATHSIG), so that no worker outlives a parent stopped by SIGTERM."""
    if getattr(signal.getsignal(signal.SIGTERM), "ours", False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if sys.platform == "linux":
            import ctypes
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


os.register_at_fork(after_in_child=sigterm_kills_children)
