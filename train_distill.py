"""
Task-agnostic distillation of a BERT teacher into a MiniMoE (or dense MiniLM) student.

Zhang et al., "Lifting the Curse of Capacity Gap in Distilling Language Models", ACL 2023: the student
mimics the teacher's last-layer self-attention relations (MiniLMv2, Wang et al. 2021) on Wikipedia
segment pairs, while its FFNs are top-1 mixtures of minimal experts (minimoe.py), trained with
relation loss + 0.01 x Switch load-balancing loss.

    python train_distill.py   # the offline demo: the embedded all-MiniLM-L6-v2 teacher, gensim's
                              # Wikipedia sample, a 3L-384H MiniMoE 1,4E student and its dense MiniLM

The paper's setting (BERT-base teacher, full English Wikipedia, 8 GPUs, batch 1024, 5 epochs):

    python train_distill.py --corpus enwiki-latest-pages-articles.xml.bz2 --teacher bert-base-uncased \
        --prepare_only                                   # tokenise once, before the GPUs wait on it
    torchrun --nproc_per_node 8 train_distill.py --corpus enwiki-latest-pages-articles.xml.bz2 \
        --teacher bert-base-uncased --student 3L-384H --experts 1,4 --batch_size 1024 --micro_batch_size 128 \
        --epochs 5 --precision fp16 --out_dir out/minimoe_3L
    (--teacher bert-large-uncased for the large teacher; --experts 1,1 for the dense MiniLM baseline;
    MiniLM with a teacher assistant: a 12L-384H student first, with --out_dir out/ta, then --teacher
    out/ta/student)

Outputs in --out_dir: student/ (HF layout: load_bert, finetune.py and a later --teacher read it),
checkpoints/step_*.pt (with .sha256; --resume; a checkpoint file also serves as --teacher), log.jsonl,
results.json, and .lock while a run uses it.

Imports run one way: minimoe <- runkeeping <- train_distill <- finetune <- eval (bench.py beside eval.py):
locks, checksums, resume state, argument types and the runtime live in runkeeping.py.
"""
import argparse
import bz2
import contextlib
import functools
import gzip
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: on a busy machine, spinning
# idle threads steal the cores from working ones (2-3x slower); a setting of your own wins

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import minimoe
from minimoe import Bert, BertConfig, load_bert, load_tokenizer, relation_loss, save_bert
from runkeeping import (FRACTION, NONNEGATIVE, POSITIVE, POSITIVE_INT, Runtime, atomic_save, checkpoints,
                        configure_optimizer, find_resume_checkpoint, hub_reachable, lock_out_dir, lr_lambda,
                        number, optimizer_step, pad_batch, remove_checkpoint, remove_stale_temp_files,
                        resumed_results, rng_state, run_script, set_rng_state, set_torch_rng_state,
                        setup_runtime, torch_rng_state, truncate_log, warn, workers_die_with_us, write_json)

DEMO_MAX_STEPS = 100  # the no-argument demo's budget, dense baseline included
DEMO_BATCH_SIZE = 16
PIPELINE_VERSION = 1  # bump when the pair-building code changes: invalidates cached pairs


# -----------------------------------------------------------------------------
# Arguments: the flags, the defaults that depend on others, the students to train


# flags that --resume may change: how long training goes on (--max_steps, --epochs: the lr schedule is
# stretched to the new end), logging, evaluation and saving, where things are, and how the hardware runs
# a batch (--micro_batch_size, --precision, --compile: the same batches, other rounding). Every other
# flag (data, model, loss, optimisation, seed) must equal the checkpoint's, or --resume refuses.
RESUME_MAY_CHANGE = ("max_steps", "epochs", "log_every", "eval_every", "eval_pairs", "save_every",
                     "keep_last", "num_proc", "cache_dir", "out_dir", "micro_batch_size", "precision",
                     "compile")
NOT_COMPARED = RESUME_MAY_CHANGE + ("resume", "overwrite", "debug", "prepare_only", "force_tokenizer",
                                    "student_specs", "attn_experts", "ffn_experts")  # the last three: derived


def default_cache_dir():
    """Where tokenised segment pairs are cached unless --cache_dir says otherwise."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "minimoe")


def add_data_args(g):
    g.add_argument("--corpus", help="a Wikipedia dump (*.xml.bz2), plain-text files (file or dir, a blank "
                   "line between documents, .gz allowed), or a HF dataset id 'name[:config]'; default: "
                   "gensim's Wikipedia sample (the embedded demo)")
    g.add_argument("--cache_dir", default=default_cache_dir(),
                   help="of the tokenised segment pairs (%(default)s)")
    g.add_argument("--max_seq_length", type=number(int, low=8), default=128, help="per pair (%(default)s)")
    g.add_argument("--short_seq_prob", type=FRACTION, default=0.1,
                   help="chance of a shorter pair, as BERT (%(default)s)")
    g.add_argument("--min_sentence_words", type=POSITIVE_INT, default=8, help="fewer: dropped (%(default)s)")
    g.add_argument("--heldout", type=number(float, above=0, high=1), default=0.05,
                   help="fraction of documents held out, at most 1000 (%(default)s)")
    g.add_argument("--num_proc", type=POSITIVE_INT, help="for reading and tokenising (all cores)")
    g.add_argument("--prepare_only", action="store_true", help="build the pair cache and exit")


def add_model_args(g):
    g.add_argument("--teacher", help="HF BERT dir or hub id, or our student dir or checkpoint file (MiniLM "
                   "w/ TA); default: the embedded all-MiniLM-L6-v2")
    g.add_argument("--tokenizer", help="default: the teacher's")
    g.add_argument("--eval_teacher", help="score the held-out relation loss against this teacher (MiniLM w/ "
                   "TA: the TA's own teacher); 'default': the embedded all-MiniLM-L6-v2")
    g.add_argument("--student", default="3L-384H",
                   help=f"size LL-HH, e.g. a preset: {', '.join(minimoe.PRESETS)} (%(default)s)")
    g.add_argument("--layers", type=POSITIVE_INT, help="override the preset's")
    g.add_argument("--hidden", type=POSITIVE_INT, help="override the preset's width (FFN: 4 x hidden)")
    g.add_argument("--heads", type=POSITIVE_INT, help="override the preset's attention heads")
    g.add_argument("--experts", default="1,4", help="attention,FFN experts; 1,1: dense MiniLM (%(default)s)")
    g.add_argument("--dropout", type=FRACTION, help="student dropout and router noise (config: 0.1)")
    g.add_argument("--num_relation_heads", type=POSITIVE_INT, default=32, help="MiniLMv2's (%(default)s)")
    g.add_argument("--teacher_layer", type=int, default=-1, help="distilled (%(default)s: last)")
    g.add_argument("--load_balance_weight", type=NONNEGATIVE, default=0.01, help="(%(default)s)")
    g.add_argument("--init_from", help="a dense student (dir or checkpoint) to upcycle")
    g.add_argument("--compare_dense", action=argparse.BooleanOptionalAction,
                   help="also train the dense student of that size on the same batches (default: on for "
                   "the demo)")
    g.add_argument("--students", nargs="+", metavar="NAME=A,E[:HEAD][@SIZE]",
                   help="several students on the same batches and teacher forward, e.g. minilm=1,1:layer "
                   "moe4=1,4 ta=1,1@4L-384H (A,E: attention,FFN experts; HEAD: auto|layer|extra; SIZE: a "
                   "preset, default --student); saved to out_dir/NAME/student")
    g.add_argument("--relation_head", default="auto", choices=["auto", "layer", "extra"],
                   help="the students' relations from the last layer's Q/K/V (layer, MiniLMv2) or an extra "
                   "Q/K/V head on the final hidden states (extra, the original MiniMoE); auto: extra with "
                   "experts, layer when dense (%(default)s)")
    g.add_argument("--expert_init", default="split", choices=["split", "independent"],
                   help="split: experts cut from one wide FFN, 2/3 of their neurons shared (the original's); "
                   "independent: each drawn on its own (%(default)s)")
    g.add_argument("--relation_dropout", type=FRACTION, default=0.0,
                   help="on the students' relation probabilities, as the original code (0.1 there); makes "
                   "the training loss noisy and larger than the KL (%(default)s)")


def add_optimisation_args(g):
    g.add_argument("--lr", type=NONNEGATIVE, default=3e-4, help="peak AdamW lr (%(default)s)")
    g.add_argument("--weight_decay", type=NONNEGATIVE, default=0.01, help="(%(default)s)")
    g.add_argument("--warmup", type=FRACTION, default=0.01, help="fraction of steps, linear (%(default)s)")
    g.add_argument("--grad_clip", type=POSITIVE, default=5.0, help="max grad norm (%(default)s)")
    g.add_argument("--batch_size", type=POSITIVE_INT, help="global, in pairs; the paper: 1024 (default: "
                   f"{DEMO_BATCH_SIZE} for the demo, 128 otherwise)")
    g.add_argument("--micro_batch_size", type=POSITIVE_INT, help="pairs per rank per forward; accumulation = "
                   "batch_size / (micro_batch_size x ranks) (default: none)")
    g.add_argument("--max_steps", type=POSITIVE_INT,
                   help=f"optimizer steps (default: {DEMO_MAX_STEPS} for the demo, otherwise --epochs)")
    g.add_argument("--epochs", type=POSITIVE, help="passes over the pairs (default: 5, the paper's)")
    g.add_argument("--seed", type=int, default=776, help="(%(default)s, the original's)")


def add_runtime_args(g):
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA if supported, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the teacher, and each student's "
                   "forward with its loss (one graph: inductor fuses dropout, GELU, relation softmaxes)")
    g.add_argument("--out_dir", default="out", help="(%(default)s)")
    g.add_argument("--log_every", type=POSITIVE_INT, default=10, help="steps (%(default)s)")
    g.add_argument("--eval_every", type=POSITIVE_INT, default=50,
                   help="steps between held-out evaluations (%(default)s)")
    g.add_argument("--eval_pairs", type=POSITIVE_INT, default=128, help="held-out pairs scored (%(default)s)")
    g.add_argument("--save_every", type=POSITIVE_INT, default=100, help="steps per checkpoint (%(default)s)")
    g.add_argument("--keep_last", type=POSITIVE_INT, default=3, help="checkpoints kept (%(default)s)")
    g.add_argument("--resume", nargs="?", const="latest",
                   help="from a checkpoint file (no value: the newest intact one in out_dir/checkpoints). "
                   "The flags must be the checkpoint's, except "
                   + ", ".join("--" + k for k in RESUME_MAY_CHANGE))
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out_dir that holds a previous run (deletes its checkpoints)")
    g.add_argument("--force_tokenizer", action="store_true",
                   help="accept a --tokenizer whose vocabulary differs from the teacher's")
    g.add_argument("--debug", action="store_true", help="a traceback for every error, user errors included")


def parse_args(argv=None):
    """The flags, with the defaults that depend on others filled in (the demo's when --corpus is not given),
    and args.student_specs, the students to train (parse_student's dicts)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p.add_argument_group("data"))
    add_model_args(p.add_argument_group("models"))
    add_optimisation_args(p.add_argument_group("optimisation"))
    add_runtime_args(p.add_argument_group("runtime and output"))
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out_dir, --overwrite deletes it: give one of them")

    demo = args.corpus is None  # the embedded no-argument run
    args.corpus = args.corpus or gensim_wiki_sample()
    args.teacher = args.teacher or minimoe.default_teacher()
    if args.eval_teacher == "default":
        args.eval_teacher = minimoe.default_teacher()
    args.batch_size = args.batch_size or (DEMO_BATCH_SIZE if demo else 128)
    if args.max_steps is None and args.epochs is None:
        args.max_steps, args.epochs = (DEMO_MAX_STEPS, None) if demo else (None, 5)
    try:
        args.attn_experts, args.ffn_experts = (int(e) for e in args.experts.split(","))
    except ValueError:
        p.error(f"--experts wants 'attention,ffn', e.g. 1,4; got {args.experts!r}")
    dense_student = args.attn_experts == 1 and args.ffn_experts == 1
    if not re.fullmatch(r"\d+L-\d+H", args.student):
        p.error(f"--student {args.student!r}: a size such as 3L-384H (presets: {', '.join(minimoe.PRESETS)})")
    if args.students:  # explicit students; --compare_dense is the shorthand for "student" + "dense"
        try:
            specs = [parse_student(t, args.student, args.relation_head) for t in args.students]
        except ValueError as e:
            p.error(str(e))
        if len({s["name"] for s in specs}) != len(specs):
            p.error("--students: names must be unique")
    else:
        compare = demo if args.compare_dense is None else args.compare_dense
        args.compare_dense = compare and not dense_student
        specs = [dict(name="student", size=args.student, attn_experts=args.attn_experts,
                      ffn_experts=args.ffn_experts, relation_head=args.relation_head, out="student")]
        # the paper's MiniLM: dense, relations of its last layer (unless told otherwise)
        if args.compare_dense:
            specs.append(dict(name="dense", size=args.student, attn_experts=1, ffn_experts=1,
                              relation_head=args.relation_head, out="student_dense"))
    args.student_specs = specs
    return args


STUDENT_SPEC = re.compile(r"(?P<name>[A-Za-z][\w.-]*)=(?P<attn>\d+),(?P<ffn>\d+)"
                          r"(?::(?P<head>auto|layer|extra))?(?:@(?P<size>\d+L-\d+H))?")


def parse_student(text, default_size, default_head):
    """'NAME=A,E[:HEAD][@SIZE]' -> a spec dict, e.g. moe4=1,4 | minilm=1,1:layer | ta=1,1@4L-384H."""
    m = STUDENT_SPEC.fullmatch(text)
    if not m:
        raise ValueError(f"--students {text!r}: expected NAME=A,E[:auto|layer|extra][@PRESET], e.g. "
                         "moe4=1,4, minilm=1,1:layer, ta=1,1@4L-384H")
    attn, ffn = int(m["attn"]), int(m["ffn"])
    if attn < 1 or ffn < 1:
        raise ValueError(f"--students {text!r}: expert counts must be >= 1")
    return dict(name=m["name"], size=m["size"] or default_size, own_size=bool(m["size"]), attn_experts=attn,
                ffn_experts=ffn, relation_head=m["head"] or default_head, out=f"{m['name']}/student")


# -----------------------------------------------------------------------------
# The script: main tells the story, the sections below follow it


def main(argv=None):
    """The story: arguments, the output directory, teacher, data, students, the loop, the saved students."""
    args = parse_args(argv)
    rt = setup_runtime(args.seed, args.precision)
    W = rt.world_size
    args.micro_batch_size = args.micro_batch_size or args.batch_size // W
    accum = args.batch_size // (args.micro_batch_size * W)
    if accum < 1 or accum * args.micro_batch_size * W != args.batch_size:
        raise SystemExit(f"--batch_size {args.batch_size} must be a multiple of micro_batch_size "
                         f"{args.micro_batch_size} x {W} ranks")
    log = print if rt.is_master else (lambda *a, **k: None)
    resume = claim_out_dir(args, rt, log)  # checked before any expensive work
    teacher, eval_teacher, tokenizer = load_teacher(args, rt)
    tcfg, pad_id = teacher.config, tokenizer.token_to_id("[PAD]") or 0
    train, heldout = load_data(args, tokenizer, rt, log)
    if args.prepare_only:
        return None
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"only {len(train)} train pairs, fewer than one batch of {args.batch_size}")
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))

    students = make_students(args, rt, tcfg, resume, total_steps, log)
    loss_fn = distill_loss  # the student's forward and loss
    if args.compile:
        teacher = torch.compile(teacher)
        loss_fn = torch.compile(distill_loss)
    run = Run(args, rt, students, total_steps, steps_per_epoch, new_results(args, argv, tcfg, students),
              eval_teacher, heldout, pad_id)
    start_or_resume(run, resume, tokenizer)
    log(f"training {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs) of {args.batch_size} "
        f"pairs = {W} ranks x {args.micro_batch_size} x {accum} accumulation; lr {args.lr}, {rt.device}, "
        f"{rt.amp_dtype or torch.float32}")
    train_loop(run, teacher, train, loss_fn, accum)
    return save_students(run, tokenizer)


def claim_out_dir(args, rt, log):
    """Lock --out_dir (refusing an unwritable one, or one another live run uses), refuse to overwrite a
    previous run by accident, and read the checkpoint to resume: the checkpoint, or None for a fresh run."""
    out_dir, ckpt_dir = Path(args.out_dir), Path(args.out_dir) / "checkpoints"
    if rt.is_master and not args.prepare_only:
        lock_out_dir(out_dir)
        remove_stale_temp_files(out_dir)
        if not args.resume and not args.overwrite:  # a finished or killed run is not overwritten by accident
            previous = checkpoints(ckpt_dir)[-1:] + [out_dir / f for f in ["results.json"] +
                                                     [s["out"] for s in args.student_specs]]
            if previous := [str(f) for f in previous if f.exists()]:
                raise SystemExit(f"{out_dir} holds a previous run ({', '.join(previous)}): pass --resume to "
                                 "continue it, --overwrite to start afresh, or another --out_dir")
    if not args.resume or args.prepare_only:
        return None
    path, resume = find_resume_checkpoint(ckpt_dir, args.resume)
    if resume is None:
        log(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
        return resume
    # refuse flags that break an exact resume (those the checkpoint does not know, from a later version, pass)
    saved = resume["args"]
    changed = [f"--{k} {saved[k]!r} (now {v!r})" for k, v in vars(args).items()
               if k in saved and k not in NOT_COMPARED and saved[k] != v]
    if changed:
        raise SystemExit(f"--resume: {path} was trained with other values of " + ", ".join(changed) +
                         ". Rerun with the checkpoint's values, or start a new run (another --out_dir, or "
                         "--overwrite). "
                         "Flags that may change on resume: " + ", ".join("--" + k for k in RESUME_MAY_CHANGE))
    log(f"resuming from {path} (step {resume['step']})")
    return resume


# -----------------------------------------------------------------------------
# Data: corpus -> documents, each a list of sentences


def gensim_wiki_sample():
    """The small English Wikipedia XML dump (206 pages) that ships with gensim's tests."""
    import gensim
    name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    path = Path(gensim.__file__).parent / "test" / "test_data" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: gensim's Wikipedia sample is missing "
                                "(reinstall gensim or pass --corpus)")
    return str(path)


TAG = re.compile(r"<ref[^>]*?>.*?</ref>|<[^>]*>")  # references with their text, then any tag
# a sentence ends at . ! or ? (optionally followed by a closing quote or bracket), then white space and
# an upper-case letter, digit or opening quote; abbreviations ("U.S. Army") split too, as in the original code
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def clean_line(line):
    """Strip what wiki cleaners leave behind: HTML tags, '''bold''' and ''italic'' quotes, list markers."""
    line = TAG.sub(" ", line).replace("'''", "").replace("''", "")
    return " ".join(line.lstrip("*#:; \t").split())


def split_sentences(text, min_words=8):
    """Sentences of a paragraph with at least `min_words` words (the MiniMoE code keeps > 7)."""
    return [s for s in SENTENCE_END.split(text) if len(s.split()) >= min_words]


@contextlib.contextmanager
def open_binary(path):
    """A file, decompressed on the fly (.gz, .bz2); a ValueError naming it when it cannot be read (a
    truncated .gz), also midway through."""
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(Path(path).suffix, open)
    try:
        with opener(path, "rb") as f:
            yield f
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def read_text_lines(lines, min_words=8):
    """Documents (lists of sentences) of text lines, a blank line ending each; a document with text but
    no sentence of min_words words comes out empty (and is counted as too short)."""
    doc, has_text = [], False
    for line in itertools.chain(lines, [""]):
        if line.strip():
            doc += split_sentences(clean_line(line), min_words)
            has_text = True
        elif has_text:
            yield doc
            doc, has_text = [], False


def utf8_lines(f, path):
    """The lines of a binary file, decoded; those that are not UTF-8 skipped and counted. WikiExtractor's
    <doc ...> and </doc> lines come out blank: they end a document."""
    skipped = 0
    for raw in f:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        yield "" if line.startswith(("<doc ", "</doc>")) else line
    if skipped:
        warn(f"{path}: skipped {skipped} lines that are not valid UTF-8")


def read_text_file(path, min_words=8):
    """Plain text, one sentence or paragraph per line, a blank line between documents (BERT's format)."""
    with open_binary(path) as f:
        yield from read_text_lines(utf8_lines(f, path), min_words)


def read_wiki_dump(path, min_words=8):
    """A Wikipedia XML dump, streamed: articles (namespace 0) through gensim's extract_pages + filter_wiki,
    redirects and markup leftovers (headings, tables, galleries) dropped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    with open_binary(path) as f:
        for _title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            text = filter_wiki(text)
            if text.lstrip()[:9].upper() == "#REDIRECT":
                continue
            lines = (ln for ln in text.splitlines()
                     if not ln.startswith(("=", "{", "|", "!")) and "|" not in ln)
            yield [s for ln in lines for s in split_sentences(clean_line(ln), min_words)]


def read_hub_dataset(spec, min_words=8):
    """The "train" split of the Hugging Face dataset "name[:config]", streamed (failing fast when offline);
    each row's "text" is one document: an article (wikipedia) or a paragraph (wikitext)."""
    import datasets
    name, _, config = spec.partition(":")
    if not minimoe.hf_offline(datasets=True) and not hub_reachable():
        raise SystemExit(f"--corpus {spec!r} is not a local file or directory, and the Hugging Face Hub "
                         "cannot be reached (offline?). Pass a Wikipedia dump (*.xml.bz2) or plain-text "
                         "files instead.")
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as e:
        raise SystemExit(f"--corpus {spec!r}: could not load this Hugging Face dataset "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    for row in rows:
        lines = [ln for ln in (row.get("text") or "").split("\n") if ln.strip()]
        yield from read_text_lines(lines, min_words)


def corpus_sources(corpus):
    """The files of a local corpus (a file, or a directory's files, hidden ones left out), or [corpus] for
    a Hugging Face dataset id; a missing path that looks local is an error."""
    p = Path(corpus).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise ValueError(f"--corpus {corpus}: the directory has no files")
        return files
    if p.is_file():
        return [str(p)]
    if minimoe.looks_local(corpus):
        raise FileNotFoundError(f"--corpus {corpus}: no such file or directory")
    return [corpus]


def is_wiki_dump(path):
    """A MediaWiki XML export (pages-articles*.xml[.bz2]) starts with <mediawiki ...>."""
    with open_binary(path) as f:
        return b"<mediawiki" in f.read(1024)


def iter_documents(sources, min_words=8):
    """{"sentences": [...]} for each document of at least two sentences (one sentence cannot make an
    A/B pair of its own) of each source: a Wikipedia dump, a plain-text file, or a hub dataset id."""
    for src in sources:
        if not Path(src).exists():
            docs = read_hub_dataset(src, min_words)
        else:
            reader = read_wiki_dump if is_wiki_dump(src) else read_text_file
            docs = reader(src, min_words)
        short = 0
        for doc in docs:
            if len(doc) >= 2:
                yield {"sentences": doc}
            else:
                short += 1
        if short:
            warn(f"{src}: skipped {short} documents with fewer than 2 sentences of >= {min_words} words")


# -----------------------------------------------------------------------------
# Data: documents -> BERT segment pairs [CLS] A [SEP] B [SEP], tokenised and cached with `datasets`


def load_data(args, tokenizer, rt, log):
    """(train, held-out) segment pairs, built by one process per node and cached; the held-out ones cut to
    --eval_pairs."""
    build = functools.partial(build_pairs, args.corpus, tokenizer, args.cache_dir, args.max_seq_length,
                              args.short_seq_prob, args.min_sentence_words, args.heldout, args.seed,
                              args.num_proc)
    if rt.local_rank == 0:
        pairs = build()
    if rt.is_ddp:
        dist.barrier()
    if rt.local_rank != 0:
        pairs = build()
    train, heldout = pairs["train"], pairs["heldout"]
    log(f"data: {len(train):,} train / {len(heldout):,} held-out pairs from {args.corpus} "
        f"(max length {args.max_seq_length}), cache {Path(train.cache_files[0]['filename']).parent.parent}")
    return train, heldout.select(range(min(args.eval_pairs, len(heldout))))


@workers_die_with_us
def build_pairs(corpus, tokenizer, cache_dir, max_seq_length=128, short_seq_prob=0.1, min_words=8,
                heldout=0.05, seed=776, num_proc=None):
    """Train and held-out segment pairs of `corpus` as a datasets.DatasetDict with splits "train" and
    "heldout" (columns input_ids int32, token_type_ids int8; variable length, no padding). The held-out
    split is a set of documents (a fraction `heldout`, at most 1000). Streams, and caches
    (pairs_cache_path)."""
    import datasets
    if max_seq_length < 8:
        raise ValueError(f"max_seq_length {max_seq_length} is too short for a segment pair")
    sources = corpus_sources(corpus)
    final = pairs_cache_path(corpus, sources, tokenizer, cache_dir, max_seq_length=max_seq_length,
                             short_seq_prob=short_seq_prob, min_words=min_words, heldout=heldout, seed=seed)
    if (final / "dataset_dict.json").exists():
        return load_pairs(final)
    build = new_build_dir(final.parent)
    try:
        docs = read_documents(sources, min_words, build / "docs", num_proc)
        if len(docs) < 2:
            raise ValueError(f"--corpus {corpus}: found {len(docs)} usable documents, need at least 2 (one "
                             f"for the held-out split); a document needs >= 2 sentences of >= {min_words} "
                             "words (plain text: one sentence or paragraph per line, a blank line between "
                             "documents)")
        n_held = min(max(1, round(heldout * len(docs))), 1000, len(docs) - 1)
        split = docs.train_test_split(test_size=n_held, seed=seed)
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                      "token_type_ids": datasets.Sequence(datasets.Value("int8"))})
        nproc = min(num_proc or os.cpu_count() or 1, max(1, len(docs) // 1000))
        if nproc > 1:
            # forked workers; avoids the deadlock warning
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        fn_kwargs = dict(tokenizer=tokenizer, max_seq_length=max_seq_length, short_seq_prob=short_seq_prob,
                         seed=seed)
        pairs = datasets.DatasetDict({
            new: split[old].map(pairs_batch, batched=True, batch_size=256, with_indices=True,
                                features=features, remove_columns=["sentences"],
                                num_proc=nproc if new == "train" else None, fn_kwargs=fn_kwargs,
                                desc=f"{new} pairs")
            for new, old in (("train", "train"), ("heldout", "test"))})
        for s in pairs:
            if len(pairs[s]) == 0:
                raise ValueError(f"--corpus {corpus}: no {s} segment pairs could be built")
        pairs.save_to_disk(str(build / "pairs"))
        try:
            os.replace(build / "pairs", final)  # atomic: a concurrent builder's copy wins, ours is dropped
        except OSError:
            if not (final / "dataset_dict.json").exists():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return load_pairs(final)


def pairs_cache_path(corpus, sources, tokenizer, cache_dir, **params):
    """Where build_pairs caches the pairs of `corpus`: a name keyed by its files (path, size, mtime), the
    tokenizer and the parameters, so that a change to any of them builds anew."""
    identity = [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns)
                if Path(f).exists() else f for f in sources]
    params = dict(version=PIPELINE_VERSION, **params, corpus=identity)
    key = hashlib.sha256((json.dumps(params, sort_keys=True) + tokenizer.to_str()).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(corpus).name or corpus)[:60]
    return Path(cache_dir).expanduser() / f"pairs-{name}-{key}"


def load_pairs(path):
    """The cached pairs, memory-mapped; a clear error when the cache was damaged (a truncated Arrow file)."""
    import datasets
    try:
        pairs = datasets.load_from_disk(str(path))
        for split in pairs.values():  # reading the last row touches the end of every Arrow file
            split[len(split) - 1]
    except Exception as e:
        raise ValueError(f"the pair cache {path} is damaged ({type(e).__name__}: {str(e)[:200]}); "
                         f"delete the cache directory {path} and run again") from None
    return pairs


def new_build_dir(cache_dir):
    """A fresh ".build-HOST-PID-random" directory to build in, after removing those of builds on this host
    whose process is gone (killed)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in cache_dir.glob(".build-*"):
        m = re.fullmatch(r"\.build-(.+)-(\d+)-[^-]+", old.name)
        if m and m[1] == host:
            try:
                os.kill(int(m[2]), 0)  # signal 0: only asks whether the process lives
            except ProcessLookupError:
                warn(f"removing {old}, left by an interrupted pair build")
                shutil.rmtree(old, ignore_errors=True)
            except PermissionError:  # it lives, owned by another user
                pass
    return Path(tempfile.mkdtemp(prefix=f".build-{host}-{os.getpid()}-", dir=cache_dir))


def read_documents(sources, min_words, cache_dir, num_proc):
    """The documents of all sources as a datasets.Dataset of {"sentences": [...]} rows, written to Arrow as
    they are read (one reader process per file, e.g. the parts of a dump); [] when there are none."""
    import datasets
    features = datasets.Features({"sentences": datasets.Sequence(datasets.Value("string"))})
    nproc = min(num_proc or os.cpu_count() or 1, len(sources))
    try:
        return datasets.Dataset.from_generator(iter_documents, features=features, cache_dir=str(cache_dir),
                                               gen_kwargs=dict(sources=sources, min_words=min_words),
                                               num_proc=nproc if nproc > 1 else None)
    except datasets.exceptions.DatasetGenerationError as e:  # our readers' clear errors, unwrapped
        cause = e.__cause__
        if type(cause).__name__ == "RemoteTraceback":  # raised in a reader process: its text only
            cause = ValueError(str(cause).split("The above exception")[0].strip().splitlines()[-1])
        raise (cause or e) from None
    except ValueError as e:
        if "corresponds to no data" not in str(e):
            raise
        return []


def document_pairs(docs, d, max_tokens, short_seq_prob, rng, random_next_prob=0.5):
    """Segment pairs (A, B) of token ids from document `d` of `docs` (lists of tokenised sentences),
    as BERT's create_instances_from_document and MiniMoE's run_building_data_bert.py: sentences are
    gathered into chunks of about max_tokens (a random shorter target with prob. short_seq_prob),
    A = the chunk's first sentences, B = the rest or, with prob. 1/2, sentences of another document."""
    doc = docs[d]
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    chunk, length, i = [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:a_end] for t in s]
            b = []
            if len(docs) > 1 and (len(chunk) == 1 or rng.random() < random_next_prob):
                o = rng.randrange(len(docs) - 1)
                other = docs[o + (o >= d)]  # any document but this one
                for s in other[rng.randrange(len(other)):]:
                    b += s
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            else:
                b = [t for s in chunk[a_end:] for t in s]
            while len(a) + len(b) > max_tokens:  # trim the longer, front or back at random (BERT)
                longer = a if len(a) > len(b) else b
                longer.pop(0) if rng.random() < 0.5 else longer.pop()
            if a and b:
                yield a, b
            chunk, length = [], 0
        i += 1


def pairs_batch(batch, indices, tokenizer, max_seq_length, short_seq_prob, seed):
    """datasets.map function: a batch of documents -> their pairs' input_ids and token_type_ids.
    Tokenises all sentences of the batch in one call; random next segments come from the same batch.
    Seeded by the batch's first index, so the result does not depend on num_proc."""
    max_tokens = max_seq_length - 3  # room for [CLS], [SEP], [SEP]
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    flat = [s for doc in batch["sentences"] for s in doc]
    ids = [e.ids[:max_tokens] for e in tokenizer.encode_batch(flat, add_special_tokens=False)]
    docs, start = [], 0
    for doc in batch["sentences"]:
        sents = [s for s in ids[start:start + len(doc)] if s]
        start += len(doc)
        if sents:
            docs.append(sents)
    rng = random.Random(f"{seed}:{indices[0]}")
    out = {"input_ids": [], "token_type_ids": []}
    for d in range(len(docs)):
        for a, b in document_pairs(docs, d, max_tokens, short_seq_prob, rng):
            out["input_ids"].append([cls] + a + [sep] + b + [sep])
            out["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1))
    return out


def collate_pairs(rows, pad_id, length=None):
    """A batch of segment pairs, as `datasets` slices them ({"input_ids": [...], "token_type_ids": [...]}),
    padded by pad_batch to T = the longest pair rounded up to 8, or `length` (static shapes for --compile)."""
    ids = rows["input_ids"]
    return pad_batch(ids, rows["token_type_ids"], pad_id, length or -(-max(map(len, ids)) // 8) * 8)


def global_batches(num_pairs, batch_size, seed, start_step=0):
    """Endless stream of global batches (lists of pair indices) from `start_step` on. Epoch e is a
    permutation seeded seed + e whose last partial batch is dropped. The data position is just the
    step number, so a resumed run, and a run on any number of ranks, sees the same batches."""
    per_epoch = num_pairs // batch_size
    step, perm = start_step, None
    while True:
        epoch, i = divmod(step, per_epoch)
        if perm is None or i == 0:
            perm = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch))
        yield perm[i * batch_size:(i + 1) * batch_size].tolist()
        step += 1


# -----------------------------------------------------------------------------
# Teacher: frozen, checked once at load, with the tokenizer the students share


def load_teacher(args, rt):
    """The frozen teacher, the one held-out relation loss is measured against (--eval_teacher: e.g. the TA's
    own teacher), and the teacher's tokenizer, which the students share."""
    teacher = load_bert(args.teacher).to(rt.device).eval().requires_grad_(False)
    check_teacher(teacher, args.teacher, args.teacher_layer)
    eval_teacher = teacher
    if args.eval_teacher:
        eval_teacher = load_bert(args.eval_teacher).to(rt.device).eval().requires_grad_(False)
        if eval_teacher.config.vocab_size != teacher.config.vocab_size:
            raise SystemExit(f"--eval_teacher {args.eval_teacher}: vocabulary of "
                             f"{eval_teacher.config.vocab_size} tokens, the teacher's has "
                             f"{teacher.config.vocab_size}; they must share a tokenizer")
    tcfg = teacher.config
    tokenizer = load_tokenizer(args.tokenizer or args.teacher)
    check_tokenizer(tokenizer, args, tcfg)
    if args.max_seq_length > tcfg.max_position_embeddings:
        raise SystemExit(f"--max_seq_length {args.max_seq_length} exceeds the teacher's "
                         f"{tcfg.max_position_embeddings} positions")
    return teacher, eval_teacher, tokenizer


def check_tokenizer(tokenizer, args, tcfg):
    """Refuse a tokenizer that does not fit the teacher (the student ships with it): one larger than the
    teacher's embedding table; unless --force_tokenizer, another size, or, given with --tokenizer, another
    vocabulary than the teacher's own."""
    n = tokenizer.get_vocab_size()
    if n > tcfg.vocab_size:  # ids past the embedding table: no flag makes this work
        raise SystemExit(f"the tokenizer has {n} tokens but the teacher's embedding table only "
                         f"{tcfg.vocab_size} rows: pass the teacher's own tokenizer (--tokenizer)")
    if args.force_tokenizer:
        return
    if n != tcfg.vocab_size:
        raise SystemExit(f"the tokenizer has {n} tokens but the teacher's embedding table {tcfg.vocab_size} "
                         "rows: pass the teacher's own tokenizer (--tokenizer), or --force_tokenizer if this "
                         "is intended")
    if args.tokenizer:
        try:
            own = load_tokenizer(args.teacher)
        except (OSError, ValueError):  # the teacher has no tokenizer files to compare with
            return
        if own.get_vocab() != tokenizer.get_vocab():  # token -> id: the same map, the same ids
            raise SystemExit(f"--tokenizer {args.tokenizer}: its vocabulary differs from the teacher's own "
                             f"({args.teacher}; same size, other tokens or ids): drop --tokenizer, or pass "
                             "--force_tokenizer if this is intended")


@torch.no_grad()
def check_teacher(teacher, path, layer=-1):
    """Blame a teacher whose outputs are not finite (overflowing weights, a bad config value) once, at load,
    on a tiny input, rather than as a training run that diverged."""
    device = next(teacher.parameters()).device
    ids = torch.arange(1, 9, device=device).clamp(max=teacher.config.vocab_size - 1)[None]  # (1, 8)
    out = teacher(ids, torch.ones_like(ids), torch.zeros_like(ids), relation_layer=layer)
    if not all(torch.isfinite(t).all() for t in (out.last_hidden_state, *out.qkv)):
        raise SystemExit(f"--teacher {path}: its outputs on a short input are not finite (NaN/inf): the "
                         "teacher's weights or config.json are broken; use another teacher")


# -----------------------------------------------------------------------------
# The distillation loss, and the held-out relation loss


def distill_loss(teacher_qkv, student, batch, num_relation_heads=32, load_balance_weight=0.01,
                 relation_dropout=0.0):
    """MiniMoE's objective: MiniLMv2 relation loss (teacher's relations vs the student's, from its last layer
    or its extra relation head) + load_balance_weight x Switch load-balancing loss.
    Returns (loss, relation, load balance, BertOutput)."""
    out = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    rel = relation_loss(teacher_qkv, out.qkv, batch["attention_mask"], num_relation_heads, relation_dropout)
    return rel + load_balance_weight * out.aux_loss, rel, out.aux_loss, out


@torch.no_grad()
def evaluate(teacher, students, pairs, rt, pad_id, batch_size, num_relation_heads=32, teacher_layer=-1):
    """Held-out relation loss of each student (eval mode: no dropout, no router noise): the mean over all
    real query rows of all pairs. Also returns each pair's (KL sum, rows), for paired bootstrap intervals."""
    sums = {name: [] for name in students}
    rows = []
    for m in students.values():
        m.eval()
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(rt.device) for k, v in collate_pairs(pairs[i:i + batch_size], pad_id).items()}
        with rt.autocast():
            t_qkv = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                            relation_layer=teacher_layer).qkv
            for name, m in students.items():
                s_qkv = m(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).qkv
                kl, n = relation_loss(t_qkv, s_qkv, batch["attention_mask"], num_relation_heads,
                                      per_sequence=True)
                sums[name].append(kl.float())
        rows.append(n)
    for m in students.values():
        m.train()
    rows = torch.cat(rows).double()  # (P,)
    per_pair = {name: torch.cat(v).double() for name, v in sums.items()}  # (P,) each
    # .item(): an evaluation point
    means = {name: (v.sum() / rows.sum()).item() for name, v in per_pair.items()}
    return means, {"rows": rows.tolist(), **{name: v.tolist() for name, v in per_pair.items()}}


# -----------------------------------------------------------------------------
# Students: configs, optimizers, RNG streams, and what the loop keeps of each


def make_students(args, rt, tcfg, resume, total_steps, log):
    """The students of the resumed run, or of --students (--student, --compare_dense), each with its own
    init, dropout stream, optimizer (AdamW), schedule (linear warmup, linear decay) and output directory."""
    if resume:
        cfgs = {k: BertConfig(**st["config"]) for k, st in resume["students"].items()}
        outs = resume["out_dirs"]
        if resume["total_steps"] != total_steps:
            log(f"note: the checkpoint's run had {resume['total_steps']} steps, this one {total_steps}")
    else:
        cfgs = {s["name"]: student_config(s, args, tcfg) for s in args.student_specs}
        outs = {s["name"]: s["out"] for s in args.student_specs}
    for k, cfg in cfgs.items():
        for name, width in (("teacher", tcfg.hidden_size), (f"student {k}", cfg.hidden_size)):
            if width % args.num_relation_heads:
                raise SystemExit(f"--num_relation_heads {args.num_relation_heads} does not divide the "
                                 f"{name}'s width {width}")
    students = {}
    for k, cfg in cfgs.items():
        torch.manual_seed(args.seed + rt.rank)  # the same init and dropout stream as a run of its own
        model = Bert(cfg)
        students[k] = Student(model, outs[k], torch_rng_state())
    if args.init_from and not resume:
        init = load_bert(args.init_from)
        try:
            # shared weights copied; a MiniMoE copies each dense FFN into all its experts
            for st in students.values():
                st.model.upcycle_from(init)
        except RuntimeError as e:
            raise SystemExit(f"--init_from {args.init_from}: does not fit the students "
                             f"({str(e)[:300]})") from None
    warmup_steps = int(args.warmup * total_steps)
    schedule = functools.partial(lr_lambda, total_steps=total_steps, warmup_steps=warmup_steps)
    for i, (k, st) in enumerate(students.items()):
        st.call = st.model.to(rt.device).train()
        if rt.is_ddp:  # with the layer relation head the last layer's FFN (and more) gets no gradient
            st.call = DDP(st.model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                          find_unused_parameters=True)
        st.optimizer = configure_optimizer(st.model, args.lr, args.weight_decay)
        st.scheduler = torch.optim.lr_scheduler.LambdaLR(st.optimizer, schedule)
        st.prefix = "" if i == 0 else f"{k}_"
        st.diverged = torch.zeros((), dtype=torch.long, device=rt.device)
    log(f"teacher {args.teacher}: {tcfg.num_layers}L-{tcfg.hidden_size}H")
    for k, st in students.items():
        count = minimoe.count_params(st.model.config)
        log(f"student {k}: {describe(st.model.config)}, {count['total'] / 1e6:.1f}M params, "
            f"{count['active'] / 1e6:.1f}M active per token -> {Path(args.out_dir) / st.out}")
    return students


def student_config(spec, args, tcfg):
    """A student's BertConfig: its size ('LL-HH', a preset's heads or --heads, FFN 4·H; --layers/--hidden
    override the --student size, not a size given in --students), the teacher's vocabulary, its experts
    and relation head."""
    layers, hidden = (int(x) for x in re.fullmatch(r"(\d+)L-(\d+)H", spec["size"]).groups())
    if not spec.get("own_size"):
        layers, hidden = args.layers or layers, args.hidden or hidden
    heads = args.heads or minimoe.PRESETS.get(spec["size"], {}).get("num_heads", 12)
    size = dict(num_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden, num_heads=heads)
    drop = {} if args.dropout is None else dict(hidden_dropout=args.dropout, attention_dropout=args.dropout,
                                                router_noise=args.dropout)
    return BertConfig(**size, **drop, vocab_size=tcfg.vocab_size, pad_token_id=tcfg.pad_token_id,
                      type_vocab_size=tcfg.type_vocab_size, num_attn_experts=spec["attn_experts"],
                      num_experts=spec["ffn_experts"], relation_head=spec["relation_head"],
                      expert_init=args.expert_init)


def describe(cfg):
    """e.g. 'MiniMoE 1,4E 3L-384H, extra relation head' or 'MiniLM 3L-384H, layer relation head'."""
    moe = cfg.num_experts > 1 or cfg.num_attn_experts > 1
    kind = f"MiniMoE {cfg.num_attn_experts},{cfg.num_experts}E" if moe else "MiniLM"
    return f"{kind} {cfg.num_layers}L-{cfg.hidden_size}H, {cfg.relation_head} relation head"


def log_sums(cfg, device):
    """A student's log window, summed on the device (no host sync): the loss it minimises, its relation and
    load-balance parts, real tokens, and router_stats, each FFN expert's share of real tokens per MoE layer,
    (L, E) ((0,) if dense)."""
    load_shape = (cfg.num_layers, cfg.num_experts) if cfg.num_experts > 1 else (0,)
    sums = {name: torch.zeros((), device=device) for name in ("loss", "rel", "lb", "tokens")}
    return {**sums, "load": torch.zeros(load_shape, device=device)}


@dataclass
class Student:
    """One student of the run, and what the loop keeps of it."""
    model: Bert  # what is saved
    out: str  # its output directory, under --out_dir
    rng: dict  # its torch RNG state between its turns: its dropout and router noise, as if it ran alone
    call: torch.nn.Module = None  # what the loop calls: `model`, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LambdaLR = None
    prefix: str = ""  # of its log fields: "" for the first student, "NAME_" for the others
    sums: dict = None  # its log window (log_sums)
    diverged: torch.Tensor = None  # first step with a non-finite loss or gradient, 0 = none (on the device)


@dataclass
class Run:
    """What the loop, its log records, evaluations and checkpoints share."""
    args: argparse.Namespace
    rt: Runtime
    students: dict  # name -> Student
    total_steps: int
    steps_per_epoch: int
    results: dict  # what results.json publishes (new_results)
    eval_teacher: Bert
    heldout: object  # the held-out pairs evaluated, a datasets.Dataset
    pad_id: int
    step: int = 0
    n_micro: int = 0  # micro-batches summed in the students' log windows
    elapsed: float = 0.0  # seconds trained before this process (a resumed run)
    t_start: float = 0.0  # when this process's loop started
    last_eval: Optional[tuple] = None  # (step, {name: held-out relation loss})
    bar: Optional[tqdm] = None

    @property
    def out_dir(self):
        return Path(self.args.out_dir)

    @property
    def ckpt_dir(self):
        return Path(self.args.out_dir) / "checkpoints"


def new_results(args, argv, tcfg, students):
    """What results.json publishes: the command, the students, and (filled in as the run goes) held-out
    relation loss per evaluation, expert load per log point, tokens/s, wall time, peak memory."""
    command = ["python", "train_distill.py", *(sys.argv[1:] if argv is None else argv)]
    cfgs = {k: st.model.config for k, st in students.items()}
    return {"command": " ".join(shlex.quote(a) for a in command), "args": dict(vars(args)),
            "teacher": {"path": args.teacher, "config": asdict(tcfg)},
            "eval_teacher": args.eval_teacher or args.teacher,
            "students": {k: {"describe": describe(cfg), "out": students[k].out, "config": asdict(cfg),
                             "params": minimoe.count_params(cfg), "heldout": [], "expert_load": []}
                         for k, cfg in cfgs.items()},
            "tok_per_s": [], "step": 0, "wall_s": 0.0, "heldout_pairs": None, "final": None, "per_pair": None}


def start_or_resume(run, resume, tokenizer):
    """A resumed run: its students, optimizers, schedules, grad scaler, RNG streams (this process's and each
    student's) and log window back, its logs cut back to the checkpoint's step. A fresh run (--overwrite):
    the old checkpoints and log gone."""
    rt, students = run.rt, run.students
    for st in students.values():
        st.sums = log_sums(st.model.config, rt.device)
    if resume:
        for k, saved in resume["students"].items():
            students[k].model.load_state_dict(saved["model"])
            students[k].optimizer.load_state_dict(saved["optimizer"])
            students[k].scheduler.load_state_dict(saved["scheduler"])
        if resume["scaler"]:  # saved by an fp16 run ({} otherwise)
            rt.scaler.load_state_dict(resume["scaler"])
        run.step, run.elapsed = resume["step"], resume["elapsed"]
        restore_streams(run, resume["rng"])
        run.results = resumed_results(run.out_dir / "results.json", run.results, run.step)
        if rt.is_master:  # steps logged after the checkpoint will be logged again
            truncate_log(run.out_dir / "log.jsonl", run.step)
    elif rt.is_master:
        if old := checkpoints(run.ckpt_dir):  # --overwrite
            print(f"fresh run: removing {len(old)} old checkpoints in {run.ckpt_dir}")
            for f in old:
                remove_checkpoint(f)
        (run.out_dir / "log.jsonl").write_text("")
    if rt.is_master:  # also when resumed into another --out_dir: so that a checkpoint file can be a --teacher
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        minimoe.atomic_write(run.ckpt_dir / "tokenizer.json", tokenizer.to_str(pretty=True))


def restore_streams(run, rng):
    """This rank's RNG streams (the process's and each student's) and log window, as the checkpoint cut them,
    so that the run goes on as if uninterrupted; for another world size, fresh but distinct and reproducible
    streams (and log window)."""
    rt, students = run.rt, run.students
    if len(rng) != rt.world_size:
        for i, st in enumerate(students.values()):
            torch.manual_seed(run.args.seed + rt.rank + 1000 * run.step + i)
            st.rng = torch_rng_state()
        torch.manual_seed(run.args.seed + rt.rank + 1000 * run.step)
        return
    mine = rng[rt.rank]
    set_rng_state(mine["process"])
    for k, st in students.items():
        st.rng = mine["students"][k]
    if window := mine.get("log_window"):  # absent from checkpoints written before windows were saved
        run.n_micro = window["n_micro"]
        for k, st in students.items():
            st.sums = {n: t.to(rt.device) for n, t in window["sums"][k].items()}
            # a window saved before the loss itself was summed: it was relation + weight · balance
            st.sums.setdefault("loss", st.sums["rel"] + run.args.load_balance_weight * st.sums["lb"])


# -----------------------------------------------------------------------------
# The loop: one teacher forward per micro-batch, then each student's forward and backward on it


def train_loop(run, teacher, train, loss_fn, accum):
    args, rt, students = run.args, run.rt, run.students
    batches = global_batches(len(train), args.batch_size, args.seed, start_step=run.step)
    t0 = run.t_start = time.time()
    run.bar = tqdm(total=run.total_steps, initial=run.step, disable=not rt.is_master, dynamic_ncols=True,
                   desc="distill")
    while run.step < run.total_steps:
        idx = next(batches)
        for k_acc in range(accum):
            # this rank's slice of the global batch
            lo = (k_acc * rt.world_size + rt.rank) * args.micro_batch_size
            rows = train[idx[lo:lo + args.micro_batch_size]]
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in
                     collate_pairs(rows, run.pad_id, args.max_seq_length if args.compile else None).items()}
            with torch.no_grad(), rt.autocast():
                t_qkv = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                relation_layer=args.teacher_layer).qkv
            for st in students.values():
                forward_backward(st, loss_fn, t_qkv, batch, args, rt, accum, sync=k_acc == accum - 1)
            run.n_micro += 1
        lr = next(iter(students.values())).optimizer.param_groups[0]["lr"]  # the lr of this step, for the log
        for st in students.values():
            step_student(st, run.step, args.grad_clip, rt)
        rt.scaler.update()
        run.step += 1
        run.bar.update(1)

        if run.step % args.log_every == 0 or run.step == run.total_steps:
            log_window(run, lr, t0)
        if rt.is_master and (run.step % args.eval_every == 0 or run.step == run.total_steps):
            check_finite(run)
            means = evaluate_and_record(run)
            append_log(run.out_dir, {"step": run.step, "heldout_rel": means})
            run.bar.write(f"step {run.step}: held-out relation loss " +
                          ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if run.step % args.save_every == 0 or run.step == run.total_steps:
            save_checkpoint(run)
        if run.step % args.log_every == 0:  # restart the clock: tokens/s leaves evaluation and saving out
            t0 = time.time()
    run.bar.close()


def forward_backward(st, loss_fn, t_qkv, batch, args, rt, accum, sync):
    """One student's forward and backward on a micro-batch, on its own RNG stream (its dropout and router
    noise, as if it ran alone); its losses, tokens and expert load added to its log window. sync: the last
    micro-batch of the step, whose backward all-reduces the gradients under DDP."""
    set_torch_rng_state(st.rng)
    with contextlib.nullcontext() if not rt.is_ddp or sync else st.call.no_sync():
        with rt.autocast():
            loss, rel, lb, out = loss_fn(t_qkv, st.call, batch, args.num_relation_heads,
                                         args.load_balance_weight, args.relation_dropout)
        rt.scaler.scale(loss / accum).backward()
    st.rng = torch_rng_state()
    st.sums["loss"] += loss.detach().float()  # what the loss function returns, any new term included
    st.sums["rel"] += rel.detach().float()
    st.sums["lb"] += lb.detach().float()
    st.sums["tokens"] += batch["attention_mask"].sum().float()
    st.sums["load"] += out.router_stats.detach()


def step_student(st, step, grad_clip, rt):
    """The student's optimizer and schedule step. Divergence is noted without a host sync: a NaN/inf loss
    since the last log, or gradient norm (with fp16 an inf gradient norm is normal: GradScaler skips it)."""
    norm = optimizer_step(st.model, st.optimizer, rt.scaler, grad_clip)
    st.scheduler.step()
    bad = ~torch.isfinite(st.sums["loss"]) if rt.scaler.is_enabled() else ~torch.isfinite(norm)
    st.diverged = torch.where(bad & (st.diverged == 0), step + 1, st.diverged)


def check_finite(run, weights=False):
    """Stop on divergence, before anything non-finite is logged or saved. A host sync: called only at
    logging, evaluation and saving points; between them `diverged` notes the first bad step on the device.
    weights: also check every weight (at saving points: an update can overflow with finite gradients)."""
    students = run.students
    first = dict(zip(students, torch.stack([st.diverged for st in students.values()]).tolist()))
    if weights:
        for k, st in students.items():
            finite = torch.stack([torch.isfinite(p).all() for p in st.model.parameters()]).all()
            if not first[k] and not finite:
                first[k] = run.step
    if bad := {k: s for k, s in first.items() if s}:
        run.bar.close()
        kept = checkpoints(run.ckpt_dir)
        raise SystemExit(f"training diverged at step {min(bad.values())}: non-finite (NaN/inf) loss, "
                         "gradients or weights of " +
                         ", ".join(f"student {k} (step {s})" for k, s in bad.items()) +
                         f" with --lr {run.args.lr}. Stopped; nothing non-finite was saved" +
                         (f", and the last checkpoint, {kept[-1]}, is intact" if kept else "") +
                         ". Try a lower --lr, more --warmup or a lower --grad_clip, in a new run "
                         "(--overwrite).")


def log_window(run, lr, t0):
    """The log.jsonl record of the window since the last one: each student's losses and expert load (means
    over micro-steps and ranks), tokens/s since t0. .tolist() and all_reduce: host syncs, only here."""
    rt, W = run.rt, run.rt.world_size
    check_finite(run)
    if rt.is_ddp:
        for t in [t for st in run.students.values() for t in st.sums.values() if t.numel()]:
            dist.all_reduce(t)
    dt = time.time() - t0
    rec = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4), "lr": lr}
    for k, st in run.students.items():
        pre = st.prefix
        means = torch.stack([st.sums[n] for n in ("loss", "rel", "lb", "tokens")]) / (run.n_micro * W)
        loss, rel, lb, tokens = means.tolist()
        rec.update({f"{pre}loss": loss, f"{pre}rel": rel, f"{pre}lb": lb})
        if not pre:  # tokens/s of one student's micro-batches: all see the same ones
            rec["tok_per_s"] = tokens * run.n_micro * W / dt
        if st.sums["load"].numel():
            load = (st.sums["load"] / (run.n_micro * W)).tolist()
            rec[f"{pre}expert_load"] = [[round(x, 4) for x in layer] for layer in load]
            run.results["students"][k]["expert_load"].append([run.step, rec[f"{pre}expert_load"]])
    if rt.is_master:
        append_log(run.out_dir, rec)
        run.bar.set_postfix(tok_s=f"{rec['tok_per_s']:.0f}", lr=f"{rec['lr']:.2e}",
                            **{k: f"{rec[st.prefix + 'rel']:.4f}" for k, st in run.students.items()})
        run.results["tok_per_s"].append([run.step, rec["tok_per_s"]])
    for st in run.students.values():
        st.sums = log_sums(st.model.config, rt.device)
    run.n_micro = 0


def append_log(out_dir, record):
    with open(Path(out_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def peak_memory_mb(device):
    """Peak resident memory of this process, and peak CUDA memory allocated (None off a GPU), in MiB."""
    import resource
    kb = 1024 if sys.platform != "darwin" else 1024 ** 2  # ru_maxrss: KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb
    cuda = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return rss, cuda


def evaluate_and_record(run):
    """Held-out relation loss of every student (the master's job), into results.json with the wall time
    and peak memory (resident, and CUDA allocated on a GPU)."""
    args, results, step = run.args, run.results, run.step
    models = {k: st.model for k, st in run.students.items()}
    means, per_pair = evaluate(run.eval_teacher, models, run.heldout, run.rt, run.pad_id,
                               args.micro_batch_size, args.num_relation_heads, args.teacher_layer)
    for k, v in means.items():
        results["students"][k]["heldout"].append([step, v])
    rss, cuda = peak_memory_mb(run.rt.device)
    results.update(step=step, wall_s=round(run.elapsed + time.time() - run.t_start, 1),
                   heldout_pairs=len(per_pair["rows"]), final=means,
                   per_pair={k: [round(x, 6) for x in v] for k, v in per_pair.items()},
                   peak_rss_mb=round(rss), peak_cuda_mb=None if cuda is None else round(cuda))
    write_json(run.out_dir / "results.json", results)
    run.last_eval = (step, means)
    return means


def save_checkpoint(run):
    """checkpoints/step_*.pt (and its .sha256): every student with its optimizer and schedule, each rank's
    RNG streams and log window; the first student's config and weights also at the top level, so that the
    file is a valid --teacher (load_bert). The last --keep_last are kept."""
    rt, students = run.rt, run.students
    check_finite(run, weights=True)
    window = {"n_micro": run.n_micro,
              "sums": {k: {n: t.detach().cpu() for n, t in st.sums.items()} for k, st in students.items()}}
    mine = {"process": rng_state(), "students": {k: st.rng for k, st in students.items()},
            "log_window": window}
    rng_all = [None] * rt.world_size
    if rt.is_ddp:
        dist.all_gather_object(rng_all, mine)
    else:
        rng_all = [mine]
    if not rt.is_master:
        return
    state = {k: {"config": asdict(st.model.config), "model": st.model.state_dict(),
                 "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict()}
             for k, st in students.items()}
    first = next(iter(state))
    ckpt = {"students": state, "out_dirs": {k: st.out for k, st in students.items()},
            "config": state[first]["config"], "model": state[first]["model"], "step": run.step,
            "total_steps": run.total_steps, "rng": rng_all,
            "elapsed": run.elapsed + time.time() - run.t_start, "scaler": rt.scaler.state_dict(),
            "args": vars(run.args)}
    try:
        atomic_save(ckpt, run.ckpt_dir / f"step_{run.step:07d}.pt", checksum=True)
    except OSError:  # a full disk: the error on a line of its own, not after the progress bar
        run.bar.close()
        raise
    for f in checkpoints(run.ckpt_dir)[:-run.args.keep_last]:
        remove_checkpoint(f)


# -----------------------------------------------------------------------------
# Save: the students as HF-layout directories, and what they reached on held-out pairs


def save_students(run, tokenizer):
    rt, result = run.rt, None
    # nothing non-finite is published (a resumed, finished run skips the loop: its weights are checked here)
    check_finite(run, weights=True)
    if rt.is_master:
        if run.last_eval is None or run.last_eval[0] != run.step:
            evaluate_and_record(run)
        result = run.last_eval[1]
        for k, st in run.students.items():
            save_bert(st.model, run.out_dir / st.out, tokenizer)
            print(f"saved {k} ({describe(st.model.config)}) to {run.out_dir / st.out}")
        print(f"held-out relation loss after {run.step} steps ({len(run.heldout)} pairs): "
              + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if rt.is_ddp:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    run_script(main)
