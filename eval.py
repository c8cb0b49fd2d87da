"""
Evaluate finetuned checkpoints (GLUE, CoNLL-2003), print the GLUE table, report compute.

    python eval.py --ckpt runs/finetune/rte                    # dev metrics of one finetuned checkpoint
    python eval.py --ckpt runs/finetune/conll --split test     # CoNLL test F1 (or --file any labelled file)
    python eval.py --tasks all --runs runs/finetune            # Markdown GLUE table (+ JSON) over a run directory
    python eval.py --compute --ckpt runs/finetune/rte          # params, FLOPs/token, latency, throughput, memory
    python eval.py --compute --preset 3L-384H --num_experts 4  # the same for a config (random weights)

Metrics are plain numpy (no sklearn/scipy/seqeval at run time; the tests use them as oracles):
accuracy, binary F1, Matthews correlation, Pearson, Spearman (average ranks for ties), and
entity-level micro F1 with exact span match (conlleval / seqeval chunking). The readers, the head
model and `predict` live in finetune.py; torch and finetune are imported inside the functions that
need them, so the metrics import with numpy alone.
"""
import argparse
import contextlib
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------
# Metrics


def accuracy(preds, labels):
    p, y = np.asarray(preds), np.asarray(labels)
    return float((p == y).mean())


def f1_binary(preds, labels, positive=1):
    """F1 of the positive class (MRPC, QQP); 0 when there is no true or predicted positive."""
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = float((p & y).sum())
    return 0.0 if tp == 0 else 2 * tp / (p.sum() + y.sum())


def matthews(preds, labels):
    """Matthews correlation (multi-class form of Gorodkin 2004, as sklearn); 0 when undefined."""
    p, y = np.asarray(preds), np.asarray(labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    K, n = len(classes), len(y)
    C = np.zeros((K, K), dtype=np.float64)  # (true, predicted)
    np.add.at(C, (inv[:n], inv[n:]), 1)
    t, q, c = C.sum(1), C.sum(0), np.trace(C)
    cov_tp, cov_pp, cov_tt = c * n - t @ q, n * n - q @ q, n * n - t @ t
    return 0.0 if cov_pp * cov_tt == 0 else float(cov_tp / math.sqrt(cov_tt * cov_pp))


def pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    d = math.sqrt((x @ x) * (y @ y))
    return float("nan") if d == 0 else float(x @ y / d)


def rankdata(x):
    """Ranks 1..n, ties get the average of the ranks they span (as scipy.stats.rankdata)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each run of equal values
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def split_tag(tag):
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '')."""
    if tag in ("O", "") or "-" not in tag:
        return "O", ""
    prefix, _, typ = tag.partition("-")
    return prefix, typ


def entities(tags):
    """Chunks (type, start, end) of one tag sequence, as conlleval / seqeval's default (non-strict)
    mode: a chunk starts at B-, at an I- after O or after another type, and ends before such a start."""
    out, start, typ = [], None, None
    prev_p, prev_t = "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):
        p, t = split_tag(tag)
        end = prev_p != "O" and (p in ("B", "O") or t != prev_t)  # the chunk before i ends here
        begin = p != "O" and (p == "B" or prev_p == "O" or t != prev_t)  # a new chunk starts at i
        if end and start is not None:
            out.append((typ, start, i - 1))
            start = None
        if begin:
            start, typ = i, t
        prev_p, prev_t = p, t
    return out


def ner_scores(gold_seqs, pred_seqs):
    """Entity-level micro precision / recall / F1 over sentences (exact type and span match)."""
    gold = {(s, *e) for s, tags in enumerate(gold_seqs) for e in entities(tags)}
    pred = {(s, *e) for s, tags in enumerate(pred_seqs) for e in entities(tags)}
    tp = len(gold & pred)
    p = tp / len(pred) if pred else 0.0
    r = tp / len(gold) if gold else 0.0
    return dict(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0)


def task_metrics(task, preds, labels):
    """The standard dev metrics of a task (fractions, not percent)."""
    if task == "conll":
        return ner_scores(labels, preds)
    if task == "stsb":
        pr, sr = pearson(preds, labels), spearman(preds, labels)
        return dict(pearson=pr, spearman=sr, corr=(pr + sr) / 2)
    out = dict(acc=accuracy(preds, labels))
    if task == "cola":
        out["mcc"] = matthews(preds, labels)
    if task in ("mrpc", "qqp"):
        out["f1"] = f1_binary(preds, labels)
        out["acc_f1"] = (out["acc"] + out["f1"]) / 2
    return out


# The paper's GLUE columns, in its order, with the metric each reports; CoNLL is shown apart.
GLUE_COLUMNS = [("SST-2", "sst2", "acc"), ("MRPC", "mrpc", "f1"), ("STS-B", "stsb", "spearman"), ("QQP", "qqp", "f1"),
                ("MNLI-m", "mnli", "m_acc"), ("MNLI-mm", "mnli", "mm_acc"), ("QNLI", "qnli", "acc"),
                ("RTE", "rte", "acc"), ("CoLA", "cola", "mcc")]
EXTRA_COLUMNS = [("CoNLL", "conll", "f1")]


def glue_row(metrics_by_task):
    """{column: score in percent or None} plus the GLUE average over the columns present."""
    row = {col: (100 * metrics_by_task[t][m] if t in metrics_by_task and m in metrics_by_task[t] else None)
           for col, t, m in GLUE_COLUMNS + EXTRA_COLUMNS}
    glue = [row[col] for col, _, _ in GLUE_COLUMNS if row[col] is not None]
    row["Avg"] = sum(glue) / len(glue) if glue else None
    return row


def markdown_table(rows):
    """rows: {name: glue_row(...)} -> Markdown, columns in the paper's order."""
    cols = [c for c, _, _ in GLUE_COLUMNS] + ["Avg"] + [c for c, _, _ in EXTRA_COLUMNS]
    metric = {c: m for c, _, m in GLUE_COLUMNS + EXTRA_COLUMNS}
    names = {"acc": "Acc", "f1": "F1", "spearman": "Spearman", "m_acc": "Acc", "mm_acc": "Acc", "mcc": "MCC"}
    head = "| model | " + " | ".join(f"{c} ({names[metric[c]]})" if c in metric else c for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join("–" if row[c] is None else f"{row[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Evaluation of finetuned checkpoints


def evaluate_checkpoint(ckpt, data_dir=None, split=None, file=None, batch_size=64, device="cpu", autocast=None):
    """Metrics of a finetuned checkpoint on its task's dev set(s), another split, or a labelled file."""
    import finetune
    model, tok, meta = finetune.load_finetuned(ckpt)
    model.to(device)
    task = finetune.get_task(meta["task"])
    splits = (split,) if split else (("dev",) if file else task.dev)
    dev_sets = {}
    for s in splits:
        ex = finetune.load_examples(task, s, data_dir, file)
        dev_sets[s] = (ex, finetune.encode(task, ex, tok, meta.get("args", {}).get("max_length", 128)))
    pad_id = tok.token_to_id("[PAD]") or 0
    return finetune.evaluate(model, task, dev_sets, batch_size, device, autocast or contextlib.nullcontext, pad_id), meta


def find_runs(root, tasks):
    """{task: run dir} under root: the finetune.json of each task with the best stored dev score (hidden
    directories, such as a save in progress, left out)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--runs {root}: no such directory (give the --out_dir parent of finetune.py runs)")
    found = {}
    for f in sorted(Path(root).rglob("finetune.json")):
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        meta = json.loads(f.read_text())
        t = meta.get("task")
        if t in tasks and (t not in found or meta["metrics"][meta["metric"]] > found[t][1]):
            found[t] = (f.parent, meta["metrics"][meta["metric"]])
    return {t: d for t, (d, _) in found.items()}


# -----------------------------------------------------------------------------
# Compute report


def peak_memory_bytes(device):
    """Peak memory of this process: CUDA max allocated, else CPU max RSS (ru_maxrss is KiB on Linux)."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def compute_report(bert, batch_size=32, seq_len=128, iters=10, warmup=3, device="cpu", autocast=None):
    """Parameters (total / active), FLOPs per token at seq_len, forward latency and throughput of one
    (batch_size, seq_len) batch of real tokens, and peak memory, on `device`."""
    import torch

    import minimoe
    cfg = bert.config
    bert = bert.to(device).eval()
    autocast = autocast or contextlib.nullcontext
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (batch_size, seq_len), generator=g).to(device)  # (B, T)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast():
                bert(ids, mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    lat = statistics.median(times)
    params, flops = minimoe.count_params(cfg), minimoe.count_flops(cfg, seq_len=128)
    return dict(device=str(device), batch_size=batch_size, seq_len=seq_len, iters=iters,
                params_total=params["total"], params_active=params["active"],
                params_non_embedding=params["non_embedding"], flops_per_token_at_128=flops["flops_per_token"],
                paper_gflops_at_128=flops["paper_gflops"], latency_ms=1000 * lat,
                throughput_seq_s=batch_size / lat, throughput_tok_s=batch_size * seq_len / lat,
                peak_memory_mb=peak_memory_bytes(device) / 2**20,
                peak_memory_kind="cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
                torch_threads=torch.get_num_threads())


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from finetune import default_data_dir
    from train_distill import NONNEGATIVE_INT, POSITIVE_INT
    p.add_argument("--ckpt", default=None, help="finetuned checkpoint dir (finetune.py); for --compute any encoder")
    p.add_argument("--tasks", default=None, help="'all' or comma-separated tasks: GLUE table over --runs")
    p.add_argument("--runs", nargs="+", default=["runs/finetune"], help="run directories, one table row each")
    p.add_argument("--cached", action="store_true", help="table from the stored dev metrics, no re-evaluation")
    p.add_argument("--data_dir", default=default_data_dir(), help="GLUE/CoNLL root, or 'hub'")
    p.add_argument("--split", default=None, help="split to evaluate (default: the task's dev set(s)); e.g. test for "
                   "CoNLL (GLUE test files have no labels)")
    p.add_argument("--file", default=None, help="any labelled file in the task's format")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=64, help="evaluation batch size")
    p.add_argument("--compute", action="store_true", help="compute report instead of task metrics")
    p.add_argument("--preset", default=None, help="--compute for a config: e.g. 3L-384H (random weights)")
    p.add_argument("--num_experts", type=POSITIVE_INT, default=1, help="with --preset")
    p.add_argument("--compute_batch", type=POSITIVE_INT, default=32, help="batch size of the latency measurement")
    p.add_argument("--seq_len", type=POSITIVE_INT, default=128, help="sequence length of the latency measurement")
    p.add_argument("--iters", type=POSITIVE_INT, default=10)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    p.add_argument("--threads", type=NONNEGATIVE_INT, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--debug", action="store_true", help="a traceback for every error, user errors included")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from train_distill import setup_runtime

    import torch

    import finetune
    import minimoe
    rt = setup_runtime(0, args.precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = None if args.data_dir in (None, "", "hub") else args.data_dir

    if args.compute:
        if args.preset:
            bert = minimoe.Bert(minimoe.BertConfig.preset(args.preset, num_experts=args.num_experts))
            name = f"{args.preset} E={args.num_experts}"
        elif args.ckpt:
            bert, name = minimoe.load_bert(args.ckpt), args.ckpt
        else:
            raise SystemExit("--compute needs --ckpt or --preset")
        rep = dict(model=name, **compute_report(bert, args.compute_batch, args.seq_len, args.iters, device=rt.device,
                                                autocast=rt.autocast))
        print(json.dumps(rep, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(rep, indent=2))
        return rep

    if args.tasks:
        tasks = [c[1] for c in GLUE_COLUMNS + EXTRA_COLUMNS] if args.tasks == "all" else \
            [finetune.get_task(t).name for t in args.tasks.split(",")]
        rows, results = {}, {}
        for root in args.runs:
            found = find_runs(root, set(tasks))
            metrics = {}
            for t in dict.fromkeys(tasks):
                if t not in found:
                    continue
                if args.cached:
                    metrics[t] = json.loads((found[t] / "finetune.json").read_text())["metrics"]
                else:
                    metrics[t], _ = evaluate_checkpoint(found[t], data_dir, batch_size=args.batch_size,
                                                        device=rt.device, autocast=rt.autocast)
                print(f"{root} {t}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics[t].items()), file=sys.stderr)
            row = rows[Path(root).name or str(root)] = glue_row(metrics)
            results[str(root)] = dict(runs={t: str(d) for t, d in found.items()}, metrics=metrics, row=row)
        table = markdown_table(rows)
        print(table)
        out = Path(args.json or Path(args.runs[0]) / "glue_results.json")
        out.write_text(json.dumps(dict(columns=[c for c, _, _ in GLUE_COLUMNS + EXTRA_COLUMNS], results=results,
                                       markdown=table), indent=2))
        print(f"wrote {out}", file=sys.stderr)
        return results

    if not args.ckpt:
        raise SystemExit("give --ckpt (one checkpoint), --tasks (GLUE table) or --compute")
    metrics, meta = evaluate_checkpoint(args.ckpt, data_dir, args.split, args.file, args.batch_size, rt.device, rt.autocast)
    rep = dict(ckpt=args.ckpt, task=meta["task"], split=args.split or ("file" if args.file else "dev"), metrics=metrics)
    print(json.dumps(rep, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    from train_distill import run_script
    run_script(main)
