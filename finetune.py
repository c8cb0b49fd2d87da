"""
Finetune a BERT / MiniMoE encoder on a GLUE task or CoNLL-2003 NER, keep the best dev checkpoint.

    python finetune.py --task rte                       # the real all-MiniLM-L6-v2, data from ../shared/data
    python finetune.py --task mrpc --model out/minimoe_3L/student --lr 1e-5,2e-5,3e-5,5e-5   # a student
    python finetune.py --task conll --lr 2e-5 --epochs 3       # token classification
    python finetune.py --task rte --protocol authors --seeds 1,2,3   # the authors' recipe, three seeds
    python finetune.py --plan plan.json                        # students x tasks x seeds, resumable

Sections: tasks and data -> tokenisation and batches -> the model with its task head and checkpoints ->
metrics and dev evaluation -> one learning rate's training -> the lr grid -> seeds and plans -> arguments.
Imports run one way: minimoe <- runkeeping <- finetune <- eval.

Recipe (MiniLM / MiniMoE finetuning): max length 128, AdamW (no decay on biases and LayerNorm),
weight decay 0.01, linear warmup over 10% of the steps then linear decay, grad-norm clip 1.0,
batch 32, lr 3e-5 (or the small grid GLUE papers search), up to 10 epochs with early stopping on the
dev score. MiniMoE's load-balancing loss stays on: loss = task loss + 0.01 * aux_loss.
--protocol authors gives the authors' finetuning recipe instead (PROTOCOLS below).
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: on a busy machine, spinning
# idle threads steal the cores from working ones (2-3x slower); a setting of your own wins

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import minimoe
from runkeeping import (FRACTION, NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, DirectoryInUse,
                        Runtime, configure_optimizer, hub_reachable, lock_out_dir, lr_lambda, number,
                        optimizer_step, pad_batch, release_lock, remove_stale_temp_files, run_script,
                        setup_runtime, write_json)

# -----------------------------------------------------------------------------
# Tasks and data


@dataclass(frozen=True)
class Task:
    name: str  # registry key, e.g. "sst2"
    folder: str  # folder in the standard GLUE layout, e.g. "SST-2"
    columns: tuple  # header names of (text_a, text_b or None, label); CoLA (no header): column indices
    labels: Optional[tuple]  # label strings as written in the files; None = regression (STS-B)
    metric: str  # dev metric that picks the best checkpoint (a key of task_metrics)
    dev: tuple = ("dev",)  # dev split(s); MNLI has matched and mismatched
    hub: tuple = ()  # (dataset id, config) for datasets.load_dataset
    kind: str = "cls"  # "cls" sentence(-pair) classification, "reg" regression, "ner" token tagging

    @property
    def num_labels(self):
        return 1 if self.kind == "reg" else len(self.labels)


# IOB2, in the hub's order
CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
GLUE = "nyu-mll/glue"
NLI = ("entailment", "not_entailment")

TASKS = {t.name: t for t in [
    Task("cola", "CoLA", (3, None, 1), ("0", "1"), "mcc", hub=(GLUE, "cola")),
    Task("sst2", "SST-2", ("sentence", None, "label"), ("0", "1"), "acc", hub=(GLUE, "sst2")),
    Task("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), ("0", "1"), "acc_f1", hub=(GLUE, "mrpc")),
    Task("stsb", "STS-B", ("sentence1", "sentence2", "score"), None, "corr", hub=(GLUE, "stsb"), kind="reg"),
    Task("qqp", "QQP", ("question1", "question2", "is_duplicate"), ("0", "1"), "acc_f1", hub=(GLUE, "qqp")),
    Task("mnli", "MNLI", ("sentence1", "sentence2", "gold_label"), ("contradiction", "entailment", "neutral"),
         "m_acc", dev=("dev_matched", "dev_mismatched"), hub=(GLUE, "mnli")),
    Task("qnli", "QNLI", ("question", "sentence", "label"), NLI, "acc", hub=(GLUE, "qnli")),
    Task("rte", "RTE", ("sentence1", "sentence2", "label"), NLI, "acc", hub=(GLUE, "rte")),
    Task("wnli", "WNLI", ("sentence1", "sentence2", "label"), ("0", "1"), "acc", hub=(GLUE, "wnli")),
    Task("conll", "conll2003", (), CONLL_TAGS, "f1", hub=("eriktks/conll2003", None), kind="ner"),
]}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "conll2003": "conll", "ner": "conll"}


def get_task(name):
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[key]


# Readers. GLUE TSVs are *not* quoted CSV (stray quotes are plain text): split each line on tabs.


class Example(NamedTuple):
    a: object  # first sentence (str), or the words of a sentence (list of str) for NER
    b: Optional[str]  # second sentence, None for single-sentence tasks and NER
    label: object  # class index (int), score (float), or IOB2 tags (list of str) for NER


def read_lines(path, keep_blank=False):
    """(line number, text) of a file's lines, blank ones dropped unless keep_blank (they separate
    CoNLL sentences); a clear error for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    lines = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # utf-8-sig: MRPC's header has a BOM
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid UTF-8 (byte {raw[e.start]:#04x}, the line's byte "
                                 f"{e.start + 1}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                                 ) from None
            lines.append((n, line.rstrip("\r\n")))  # a \r inside a line is text (some GLUE rows have one)
    if len(lines) == 1 and "\r" in lines[0][1]:
        raise ValueError(f"{path}: lines end in a bare carriage return (old Mac line endings); convert them "
                         "to \\n (e.g. tr '\\r' '\\n' < old > new)")
    if not any(s.strip() for _, s in lines):
        raise ValueError(f"{path}: file is empty")
    return lines if keep_blank else [(n, s) for n, s in lines if s.strip()]


def read_glue(task, path):
    """Labelled examples of one GLUE TSV (train/dev layout; CoLA's files have no header)."""
    lines = read_lines(path)
    ca, cb, cl = task.columns
    if isinstance(ca, str):  # header names -> column indices
        (_, head), lines = lines[0], lines[1:]
        header = head.split("\t")
        if missing := [c for c in (ca, cb, cl) if c is not None and c not in header]:
            raise ValueError(f"{path}:1: header lacks column(s) {missing} for {task.name} "
                             f"(header: {str(header)[:200]})")
        ca, cb, cl = (header.index(c) if c is not None else None for c in (ca, cb, cl))
        ncol = len(header)
        if not lines:
            raise ValueError(f"{path}: header but no data rows")
    else:
        ncol = 4  # CoLA: source, label, original label, sentence
    label_id = {s: i for i, s in enumerate(task.labels or ())}
    out = []
    for n, line in lines:
        f = line.split("\t")
        if len(f) != ncol:
            raise ValueError(f"{path}:{n}: expected {ncol} tab-separated columns, found {len(f)}")
        raw = f[cl].strip()
        if task.labels:  # a class name
            if raw not in label_id:
                raise ValueError(f"{path}:{n}: unknown label {raw!r} for {task.name} "
                                 f"(expected one of {list(task.labels)})")
            label = label_id[raw]
        else:  # a regression score (STS-B)
            try:
                label = float(raw)
            except ValueError:
                raise ValueError(f"{path}:{n}: score {raw!r} is not a number") from None
            if not math.isfinite(label):
                raise ValueError(f"{path}:{n}: score {raw!r} is not finite")
        out.append(Example(f[ca], f[cb] if cb is not None else None, label))
    return out


def iob1_to_iob2(tags):
    """IOB1 (an entity starts with I- unless it follows one of the same type) -> IOB2 (always B-)."""
    out = []
    for i, t in enumerate(tags):
        prev = out[i - 1] if i else "O"
        if t.startswith("I-") and (prev == "O" or prev[2:] != t[2:]):
            t = "B-" + t[2:]
        out.append(t)
    return out


def read_conll(path, tags=CONLL_TAGS):
    """Sentences of a CoNLL-2003 file (`word POS chunk NER` per line, blank line between sentences,
    -DOCSTART- lines ignored), tags converted to IOB2."""
    known = {t[2:] for t in tags if t != "O"}
    out, words, labels = [], [], []
    for n, line in read_lines(path, keep_blank=True) + [(0, "")]:  # a blank line ends the last sentence
        f = line.split()
        if not f or f[0] == "-DOCSTART-":
            if words:
                out.append(Example(words, None, iob1_to_iob2(labels)))
            words, labels = [], []
            continue
        if len(f) < 2:
            raise ValueError(f"{path}:{n}: expected 'word ... TAG' columns, found {line!r}")
        tag = f[-1]
        if not (tag == "O" or (tag[:2] in ("B-", "I-") and tag[2:] in known)):
            raise ValueError(f"{path}:{n}: unknown NER tag {tag!r} (expected O or B-/I- of {sorted(known)})")
        words.append(f[0])
        labels.append(tag)
    if not out:
        raise ValueError(f"{path}: no sentences")
    return out


CONLL_FILES = {"train": ("train.txt", "eng.train"), "dev": ("dev.txt", "valid.txt", "eng.testa"),
               "test": ("test.txt", "eng.testb")}


def find_file(task, split, data_dir):
    """The file of `split` under data_dir: DIR/glue/TASK/split.tsv, DIR/TASK/split.tsv or DIR/split.tsv
    (CoNLL: DIR/conll2003/train.txt, eng.train, ...)."""
    d = Path(data_dir)
    names = CONLL_FILES.get(split, (split + ".txt",)) if task.kind == "ner" else (split + ".tsv",)
    roots = [d / "glue" / task.folder, d / task.folder, d] if task.kind != "ner" else [d / task.folder, d]
    for r in roots:
        for name in names:
            if (r / name).is_file():
                return r / name
    raise FileNotFoundError(f"no {split} file for {task.name} under {d} (looked for {names[0]} in "
                            f"{', '.join(str(r) for r in roots)})")


def load_hub(task, split):
    """Examples from the Hugging Face hub (nyu-mll/glue, eriktks/conll2003) through `datasets`."""
    name, config = task.hub
    hub_split = {"dev": "validation", "dev_matched": "validation_matched",
                 "dev_mismatched": "validation_mismatched"}.get(split, split)
    if not minimoe.hf_offline(datasets=True) and not hub_reachable():
        raise ConnectionError(f"cannot reach the Hugging Face hub to fetch {name} ({config or 'default'}, "
                              f"{split}); offline? Pass --data_dir DIR holding the GLUE TSVs "
                              "(DIR/glue/RTE/train.tsv, ...) or the CoNLL-2003 files "
                              "(DIR/conll2003/train.txt, ...), or set HF_HUB_OFFLINE=1 to use a cached copy.")
    import datasets
    ds = datasets.load_dataset(name, config, split=hub_split)
    if task.kind == "ner":
        names = ds.features["ner_tags"].feature.names
        return [Example(list(r["tokens"]), None, [names[t] for t in r["ner_tags"]]) for r in ds]
    cols = {"cola": ("sentence", None), "sst2": ("sentence", None), "qqp": ("question1", "question2"),
            "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence")
            }.get(task.name, ("sentence1", "sentence2"))
    feat = ds.features["label"]
    if task.kind == "reg":
        to_label = float
    elif task.labels == ("0", "1"):
        to_label = int  # hub 0/1 = GLUE file 0/1 (unacceptable/acceptable, negative/positive, ...)
    else:
        ids = {s: i for i, s in enumerate(task.labels)}
        # e.g. MNLI: the hub's order is entailment, neutral, contradiction
        to_label = lambda v: ids[feat.names[v]]  # noqa: E731
    return [Example(r[cols[0]], r[cols[1]] if cols[1] else None, to_label(r["label"]))
            for r in ds if r["label"] != -1]


def load_examples(task, split, data_dir=None, file=None):
    """Examples of a split from an explicit file, from data_dir, or (data_dir None) from the hub."""
    if file is None and data_dir is None:
        return load_hub(task, split)
    path = Path(file) if file else find_file(task, split, data_dir)
    return read_conll(path) if task.kind == "ner" else read_glue(task, path)


def default_data_dir():
    """$MINIMOE_DATA: a folder of GLUE TSVs / CoNLL-2003 files (README, "Data"); unset, the hub."""
    return os.environ.get("MINIMOE_DATA") or None


# -----------------------------------------------------------------------------
# Tokenisation and batches (dynamic padding: each batch is padded to its own longest row)


class Feature(NamedTuple):
    ids: list  # token ids, [CLS] A [SEP] (B [SEP])
    types: list  # token type ids
    label: object  # int / float, or per-token label ids with -100 on ignored sub-words (NER)
    word_ids: Optional[list] = None  # NER: word index of each token, None for [CLS]/[SEP]


def align_labels(word_ids, word_labels):
    """First-subword labelling: each word's label on its first sub-word, -100 on the others and on
    special tokens (ignored by the loss)."""
    out, prev = [], None
    for w in word_ids:
        out.append(-100 if w is None or w == prev else word_labels[w])
        prev = w
    return out


def word_predictions(word_ids, token_preds, num_words, fill):
    """Inverse of align_labels: the prediction of each word's first sub-word; words cut off by
    truncation get `fill`."""
    out, prev = [fill] * num_words, None
    for w, p in zip(word_ids, token_preds):
        if w is not None and w != prev:
            out[w] = p
        prev = w
    return out


def encode(task, examples, tok, max_length=128):
    """Examples -> Features, truncated to max_length tokens (longest sequence first for pairs)."""
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    tok.no_padding()
    if task.kind == "ner":
        tag_id = {t: i for i, t in enumerate(task.labels)}
        encs = tok.encode_batch([e.a for e in examples], is_pretokenized=True)
        return [Feature(enc.ids, enc.type_ids, align_labels(enc.word_ids, [tag_id[t] for t in e.label]),
                        enc.word_ids) for e, enc in zip(examples, encs)]
    encs = tok.encode_batch([(e.a, e.b) if e.b is not None else e.a for e in examples])
    return [Feature(enc.ids, enc.type_ids, e.label) for e, enc in zip(examples, encs)]


def collate_features(features, pad_id=0):
    """Features -> a batch padded to its longest row: input_ids, attention_mask, token_type_ids, labels."""
    T = max(len(f.ids) for f in features)
    batch = pad_batch([f.ids for f in features], [f.types for f in features], pad_id, T)
    if isinstance(features[0].label, list):  # NER: (B, T), -100 on padding
        labels = nn.utils.rnn.pad_sequence([torch.tensor(f.label) for f in features], batch_first=True,
                                           padding_value=-100)
    else:
        dtype = torch.float32 if isinstance(features[0].label, float) else torch.long
        labels = torch.tensor([f.label for f in features], dtype=dtype)  # (B,)
    return dict(batch, labels=labels)


def train_batches(lengths, batch_size, generator, rank=0, world_size=1, group_by_length=True):
    """Shuffled index batches for one epoch. group_by_length: sort each window of 50 batches by length
    and shuffle the batches (as Hugging Face's group_by_length), so dynamic padding pads little.
    With DDP every rank gets the same number of batches."""
    n = len(lengths)
    perm = torch.randperm(n, generator=generator).tolist()
    if group_by_length:
        w = 50 * batch_size
        perm = [i for s in range(0, n, w) for i in sorted(perm[s:s + w], key=lambda i: -lengths[i])]
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches[rank:len(batches) // world_size * world_size:world_size]  # the same count on every rank


# -----------------------------------------------------------------------------
# Model and head, and the checkpoints they make


class TaskModel(nn.Module):
    """A `minimoe.Bert` plus a task head: pooler (Linear + tanh on [CLS]) + dropout + classifier (1 output
    for regression), or dropout + a per-token classifier for NER. pooling="mean" pools the mean of the real
    tokens instead of [CLS] (how sentence-embedding models such as all-MiniLM-L6-v2 were trained)."""

    def __init__(self, bert, kind, num_labels, pooling="cls"):
        super().__init__()
        H = bert.config.hidden_size
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.bert, self.kind, self.pooling = bert, kind, pooling
        self.pooler = nn.Linear(H, H) if kind != "ner" else None
        self.dropout = nn.Dropout(bert.config.hidden_dropout)
        self.classifier = nn.Linear(H, num_labels)
        for m in (self.pooler, self.classifier):  # BERT init
            if m is not None:
                nn.init.normal_(m.weight, std=bert.config.initializer_range)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        """-> (logits, task loss or None, aux_loss): logits (B, C), (B,) for regression, (B, T, C) for NER."""
        out = self.bert(input_ids, attention_mask, token_type_ids)
        h = out.last_hidden_state  # (B, T, H)
        if self.kind == "ner":
            logits = self.classifier(self.dropout(h)).float()  # (B, T, C)
        else:
            if self.pooling == "mean":
                m = attention_mask[..., None].to(h.dtype)  # (B, T, 1)
                first = (h * m).sum(1) / m.sum(1).clamp_min(1)  # (B, H), mean of the real tokens
            else:
                first = h[:, 0]  # (B, H), the [CLS] token
            pooled = torch.tanh(self.pooler(first))  # (B, H)
            logits = self.classifier(self.dropout(pooled)).float()  # (B, C)
        if self.kind == "reg":
            logits = logits.squeeze(-1)  # (B,)
        loss = None
        if labels is not None:
            if self.kind == "reg":
                loss = F.mse_loss(logits, labels.float())
            else:
                loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)
        return logits, loss, out.aux_loss


def pretrained_pooler(path):
    """The checkpoint's pooler (pooler.dense.*) when it has one, else None (Hugging Face
    BertForSequenceClassification starts from it too). Reads only those two tensors."""
    p = Path(path)
    names = [prefix + "pooler.dense." + w for prefix in ("", "bert.") for w in ("weight", "bias")]
    if (p / "model.safetensors").is_file():
        from safetensors import safe_open
        with safe_open(str(p / "model.safetensors"), "pt") as f:
            state = {k: f.get_tensor(k) for k in names if k in f.keys()}
    elif (p / "pytorch_model.bin").is_file():
        state = torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        return None
    for prefix in ("", "bert."):
        if prefix + "pooler.dense.weight" in state:
            return {w: state[prefix + "pooler.dense." + w].float() for w in ("weight", "bias")}
    return None


def build_model(task, path, init_pooler=True, pooling="cls"):
    """A TaskModel (in train mode) from any encoder checkpoint that minimoe.load_bert reads."""
    bert = minimoe.load_bert(path, relation_head="layer")  # an extra relation head serves distillation only
    model = TaskModel(bert, task.kind, task.num_labels, pooling=pooling)
    pooler = pretrained_pooler(path) if init_pooler and model.pooler is not None else None
    if pooler is not None and pooler["weight"].shape == model.pooler.weight.shape:
        model.pooler.load_state_dict(pooler)
    return model.train()


def save_finetuned(model, out_dir, tok, meta):
    """A finetuned checkpoint directory: the encoder (minimoe.save_bert), head.safetensors, finetune.json.
    Atomic as a set: written to out_dir/.saving (finetune.json last), then moved in by commit_saved; a save
    killed before then leaves the previous set as it was, one killed while moving is finished later."""
    from safetensors.torch import save
    out = Path(out_dir)
    commit_saved(out)  # an earlier save that was killed while moving in
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)  # or one killed while writing: dropped
    minimoe.save_bert(model.bert, tmp, tokenizer=tok)
    head = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith("bert.")}
    minimoe.atomic_write(tmp / "head.safetensors", save(head))
    write_json(tmp / "finetune.json", meta)  # the set is complete from here on
    commit_saved(out)


def commit_saved(out):
    """Move a complete set of files from out/.saving into out, finetune.json last. From the moment the
    old finetune.json is removed until the new one lands, `out` is no checkpoint (load_finetuned would
    finish the move first), so its files never mix two saves."""
    tmp = Path(out) / ".saving"
    if not (tmp / "finetune.json").is_file():
        return
    (Path(out) / "finetune.json").unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "finetune.json"):
        os.replace(f, Path(out) / f.name)
    tmp.rmdir()


def read_meta(directory, need=("task", "num_labels")):
    """A checkpoint's finetune.json, with the keys `need`: a clear error naming the file otherwise."""
    f = Path(directory) / "finetune.json"
    if not f.is_file():
        raise FileNotFoundError(f"{directory}: no finetune.json (not a checkpoint written by finetune.py)")
    try:
        meta = json.loads(f.read_text())
    except ValueError as e:  # invalid JSON or UTF-8: a half-written or damaged file
        raise ValueError(f"{f}: not valid JSON, damaged or cut short ({e})") from None
    if not isinstance(meta, dict) or (missing := [k for k in need if k not in meta]):
        raise ValueError(f"{f}: lacks {', '.join(need if not isinstance(meta, dict) else missing)} "
                         "(not written by finetune.py?)")
    return meta


def load_finetuned(path, **overrides):
    """(TaskModel in eval mode, tokenizer, meta) from a directory written by save_finetuned."""
    from safetensors.torch import load_file
    p = Path(path)
    commit_saved(p)  # a save that was killed while moving its files in
    meta = read_meta(p)
    task = get_task(meta["task"])
    model = TaskModel(minimoe.load_bert(p, **overrides), task.kind, meta["num_labels"],
                      pooling=meta.get("pooling", "cls"))
    head = load_file(str(p / "head.safetensors"))
    missing, unexpected = model.load_state_dict(head, strict=False)
    missing = [k for k in missing if not k.startswith("bert.")]
    if unexpected or missing:
        raise ValueError(f"{p / 'head.safetensors'}: head does not match the task {task.name} "
                         f"(missing {missing}, unexpected {unexpected})")
    return model.eval(), minimoe.load_tokenizer(p), meta


# -----------------------------------------------------------------------------
# Dev evaluation: the metrics, in plain numpy (tests/test_metrics.py checks them against scikit-learn, scipy
# and seqeval), and prediction


def accuracy(preds, labels):
    return float((np.asarray(preds) == np.asarray(labels)).mean())


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
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def split_tag(tag):
    """'B-PER' -> ('B', 'PER'); 'O' (or any tag without a dash) -> ('O', '')."""
    prefix, _, typ = tag.partition("-") if "-" in tag else ("O", "", "")
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


@torch.no_grad()
def predict(model, features, batch_size=64, device="cpu", autocast=contextlib.nullcontext, pad_id=0):
    """Predictions in the order of `features`: class ids, scores (regression), or per-token class ids
    (NER), batched by length to pad little. `autocast`: a function returning a context manager."""
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i].ids))
    preds = [None] * len(features)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate_features([features[i] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with autocast():
            logits = model(**batch)[0]
        if model.kind == "reg":
            p = logits.float().cpu().tolist()  # host sync: evaluation only
        elif model.kind == "cls":
            p = logits.argmax(-1).cpu().tolist()
        else:
            am = logits.argmax(-1).cpu()  # (B, T)
            p = [am[j, :len(features[i].ids)].tolist() for j, i in enumerate(idx)]
        for i, pi in zip(idx, p):
            preds[i] = pi
    return preds


def evaluate(model, task, dev_sets, batch_size=64, device="cpu", autocast=contextlib.nullcontext, pad_id=0):
    """Dev metrics: {split prefix + metric: value}. dev_sets: {split: (examples, features)}.
    MNLI's two dev sets give m_acc and mm_acc."""
    out = {}
    for split, (examples, features) in dev_sets.items():
        preds = predict(model, features, batch_size, device, autocast, pad_id)
        if task.kind == "ner":
            preds = [[task.labels[t] for t in word_predictions(f.word_ids, p, len(e.a), 0)]
                     for e, f, p in zip(examples, features, preds)]
        golds = [e.label for e in examples]
        prefix = {"dev_matched": "m_", "dev_mismatched": "mm_"}.get(split, "")
        out.update({prefix + k: v for k, v in task_metrics(task.name, preds, golds).items()})
    return out


# -----------------------------------------------------------------------------
# One learning rate: training with dev evaluation and early stopping


@dataclass
class Context:
    """What the learning rates of one finetune() call share: settings, data, schedule and outputs."""
    args: argparse.Namespace
    task: Task
    rt: Runtime
    model_path: object  # the encoder finetuned, recorded in finetune.json
    out_dir: Path
    tok: object = None  # the tokenizers.Tokenizer, saved with the checkpoint
    pad_id: int = 0
    train_f: list = None  # the training examples' Features
    lengths: list = None  # their lengths in tokens
    dev_sets: dict = None  # {split: (examples, features)}
    longest: int = 0  # tokens of the longest train or dev example
    steps_per_epoch: int = 0
    total_steps: int = 0  # per learning rate
    warmup_steps: int = 0
    eval_every: int = 0
    log: object = None  # log.jsonl, open on the master (None on the other ranks)
    best: dict = None  # the grid's best evaluation so far: the checkpoint in out_dir


def log_event(log, rec):
    print(json.dumps(rec), file=log, flush=True)


def setup_lr(ctx, lr):
    """(raw model, model to train (compiled, DDP), optimizer, schedule) for one learning rate."""
    args, rt = ctx.args, ctx.rt
    torch.manual_seed(args.seed)  # same head init and data order for every lr
    raw = build_model(ctx.task, ctx.model_path, not args.no_pooler_init, args.pooling).to(rt.device)
    positions = raw.bert.config.max_position_embeddings
    if ctx.longest > positions:
        raise SystemExit(f"--max_length {args.max_length}: examples of up to {ctx.longest} tokens, but "
                         f"{ctx.model_path} has {positions} positions; pass --max_length {positions} "
                         "(longer examples are then truncated)")
    model = torch.compile(raw) if args.compile else raw
    if rt.is_ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    opt = configure_optimizer(raw, lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, ctx.total_steps, ctx.warmup_steps))
    return raw, model, opt, sched


def train_one_lr(ctx, lr):
    """Train at one learning rate, evaluating on dev and stopping early; -> its entry of the grid."""
    args, rt = ctx.args, ctx.rt
    raw, model, opt, sched = setup_lr(ctx, lr)
    gen = torch.Generator().manual_seed(args.seed)
    stop, t0 = False, time.time()
    run = dict(lr=lr, t0=t0, score=-math.inf, metrics=None, step=0, bad_evals=0, best_by_metric={}, last=None)
    loss_sum = aux_sum = torch.zeros((), device=rt.device)
    n_sum = 0
    from tqdm import tqdm
    bar = tqdm(total=ctx.total_steps, desc=f"{ctx.task.name} lr {lr:g}", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, disable=not rt.is_master)

    def epochs():  # batches epoch after epoch, each epoch shuffled anew, until the loop stops
        while True:
            yield from train_batches(ctx.lengths, args.batch_size, gen, rt.rank, rt.world_size,
                                     not args.no_group_by_length)

    for step, idx in enumerate(epochs(), 1):
        batch = collate_features([ctx.train_f[i] for i in idx], ctx.pad_id)
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
        model.train()
        with rt.autocast():
            _, loss, aux = model(**batch)
            total = loss + args.load_balance_weight * aux
        rt.scaler.scale(total).backward()
        optimizer_step(raw, opt, rt.scaler, args.grad_clip)
        rt.scaler.update()
        sched.step()
        loss_sum, aux_sum, n_sum = loss_sum + loss.detach(), aux_sum + aux.detach(), n_sum + 1
        bar.update(1)
        if rt.is_master and (step % args.log_every == 0 or step == ctx.total_steps):
            rec = dict(event="train", lr=lr, step=step, epoch=round(step / ctx.steps_per_epoch, 3),
                       loss=loss_sum.item() / n_sum, aux_loss=aux_sum.item() / n_sum,  # host sync: logs
                       lr_now=sched.get_last_lr()[0], elapsed=round(time.time() - t0, 1))
            log_event(ctx.log, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            loss_sum = aux_sum = torch.zeros((), device=rt.device)
            n_sum = 0
        if step % ctx.eval_every == 0 or step == ctx.total_steps:
            stop = evaluate_and_keep(ctx, raw, run, step)
        if stop or step >= ctx.total_steps:
            break
    bar.close()
    if rt.is_master:
        print(f"lr {lr:g}: best dev {ctx.task.metric} {run['score']:.4f} at step {run['step']} "
              f"({step} steps, {time.time() - t0:.0f}s)" + (", then diverged" if run.get("diverged") else ""))
    return dict(score=run["score"] if math.isfinite(run["score"]) else None, metrics=run["metrics"],
                best_step=run["step"], steps=step, diverged_at=run.get("diverged"), last_metrics=run["last"],
                best_by_metric=run["best_by_metric"], wall_s=round(time.time() - t0, 1))


def evaluate_and_keep(ctx, raw, run, step):
    """Dev evaluation on the master of `raw` at `step` of the run of one lr (run: its best and last scores,
    updated); keeps the grid-best checkpoint; returns True when patience runs out."""
    args, rt, lr = ctx.args, ctx.rt, run["lr"]
    stop = False
    # a diverged model (NaN weights predict class 0 everywhere: a majority-class score) is never evaluated
    # nor kept (host sync: evaluation only)
    diverged = rt.is_master and not all(torch.isfinite(p).all() for p in raw.parameters())
    if diverged:
        run["diverged"] = step
        log_event(ctx.log, dict(event="diverged", lr=lr, step=step))
        print(f"\nlr {lr:g}: non-finite (NaN/inf) weights at step {step}: this learning rate diverged "
              "and is dropped")
        stop = True
    elif rt.is_master:
        metrics = evaluate(raw, ctx.task, ctx.dev_sets, args.eval_batch_size, rt.device, rt.autocast,
                           ctx.pad_id)
        score = metrics[ctx.task.metric]
        if not math.isfinite(score):  # e.g. the correlation of constant predictions: the worst score
            score = -math.inf
        if score > run["score"]:
            run.update(score=score, metrics=metrics, step=step, bad_evals=0)
        else:
            run["bad_evals"] += 1
        run["last"] = metrics  # the last checkpoint's scores: the best of many dev evaluations is optimistic
        for k, v in metrics.items():  # each metric's own best (MNLI-mm apart from MNLI-m, as the authors)
            if math.isfinite(v) and v > run["best_by_metric"].get(k, [-math.inf])[0]:
                run["best_by_metric"][k] = [v, step]
        epoch = round(step / ctx.steps_per_epoch, 3)
        log_event(ctx.log, dict(event="eval", lr=lr, step=step, epoch=epoch, dev=metrics, best=run["score"],
                                elapsed=round(time.time() - run["t0"], 1)))
        print(f"\nstep {step} (epoch {epoch:.2f}) dev "
              + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if score > ctx.best["score"]:
            keep_best(ctx, raw, metrics, score, lr, step, epoch)
        if args.patience_unit == "epochs":  # the authors': steps since the best evaluation >= patience epochs
            stop = args.patience > 0 and step - run["step"] >= args.patience * ctx.steps_per_epoch
        else:
            stop = args.patience > 0 and run["bad_evals"] >= args.patience
    if rt.is_ddp:  # every rank follows the master's early-stopping decision
        flag = torch.tensor(int(stop), device=rt.device)
        torch.distributed.broadcast(flag, 0)
        stop = bool(flag.item())
    return stop


def keep_best(ctx, raw, metrics, score, lr, step, epoch):
    """A new best of the whole grid: remember it, and save it as the run's checkpoint."""
    ctx.best.update(score=score, metrics=metrics, lr=lr, step=step)
    if ctx.args.no_save:
        return
    task = ctx.task
    meta = dict(task=task.name, kind=task.kind, labels=list(task.labels) if task.labels else None,
                num_labels=task.num_labels, pooling=ctx.args.pooling, metric=task.metric, metrics=metrics,
                lr=lr, step=step, epoch=epoch, init=str(ctx.model_path), train_examples=len(ctx.train_f),
                args=vars(ctx.args))
    save_finetuned(raw, ctx.out_dir, ctx.tok, meta)


# -----------------------------------------------------------------------------
# The grid: every learning rate from the same start, the best kept


def prepare_data(ctx, data_dir):
    """Tokenise the train and dev sets into ctx and fix the step schedule every learning rate follows."""
    args, task, rt = ctx.args, ctx.task, ctx.rt
    ctx.tok = minimoe.load_tokenizer(args.tokenizer or ctx.model_path)
    ctx.pad_id = ctx.tok.token_to_id("[PAD]") or 0
    train = load_examples(task, "train", data_dir, args.train_file)
    if args.max_train_examples:
        train = train[:args.max_train_examples]
    dev_splits = ("dev",) if args.dev_file else task.dev
    dev_sets = {s: load_examples(task, s, data_dir, args.dev_file) for s in dev_splits}
    ctx.train_f = encode(task, train, ctx.tok, args.max_length)
    ctx.dev_sets = {s: (ex, encode(task, ex, ctx.tok, args.max_length)) for s, ex in dev_sets.items()}
    ctx.lengths = [len(f.ids) for f in ctx.train_f]
    ctx.longest = max(ctx.lengths + [len(f.ids) for _, fs in ctx.dev_sets.values() for f in fs])
    ctx.steps_per_epoch = len(train_batches(ctx.lengths, args.batch_size, torch.Generator(), rt.rank,
                                            rt.world_size))
    if ctx.steps_per_epoch == 0:
        raise ValueError(f"{len(ctx.train_f)} training examples make no batch on each of {rt.world_size} "
                         "ranks")
    ctx.total_steps = max(1, math.ceil(args.epochs * ctx.steps_per_epoch))
    if args.max_steps:
        ctx.total_steps = min(ctx.total_steps, args.max_steps)
    ctx.warmup_steps = int(args.warmup * ctx.total_steps)
    ctx.eval_every = args.eval_every or ctx.steps_per_epoch
    if rt.is_master:
        print(f"train {len(train)} examples, dev {[len(ex) for ex, _ in ctx.dev_sets.values()]} | "
              f"{ctx.steps_per_epoch} steps/epoch, {ctx.total_steps} steps per lr, "
              f"{eval_schedule(ctx.eval_every, ctx.total_steps, per_epoch=not args.eval_every)}")


def eval_schedule(eval_every, total_steps, per_epoch=False):
    """When a run of total_steps evaluates on dev, in words: every eval_every steps and at the last step."""
    if eval_every >= total_steps:
        return f"dev evaluation at the last step ({total_steps})"
    last = "" if total_steps % eval_every == 0 else f" and at the last ({total_steps})"
    return f"dev evaluation every {eval_every} steps{' (each epoch)' if per_epoch else ''}{last}"


def run_dir(args):
    return Path(args.out_dir or f"runs/finetune/{get_task(args.task).name}")


def new_folders(path):
    """path and its parents that do not exist yet, nearest first: what a run that fails early removes."""
    return [d for d in (path, *path.parents) if not d.exists()]


def finetune(args, keep_lock=False, made=None):
    """One finetuning run (all learning rates of the grid) of args.task; returns the grid's best. The run
    directory's lock is released at the end, unless keep_lock (run_plan releases it after done.json).
    made: the folders the run made, nearest first (run_plan, which locks the directory first, says)."""
    rt = setup_runtime(args.seed, args.precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(args, get_task(args.task), rt, args.model or minimoe.default_teacher(), run_dir(args))
    out_dir, data_dir = ctx.out_dir, None if args.data_dir in (None, "", "hub") else args.data_dir
    if made is None:
        made = new_folders(out_dir) if rt.is_master else []
    if rt.is_master:
        lock = lock_out_dir(out_dir, "finetune run")  # creates it; refuses a file, or a directory in use
        clear_previous_run(out_dir, args.overwrite)  # or refuses one that holds a run: one run per directory
        print(f"task {ctx.task.name} | model {ctx.model_path} | data {args.train_file or data_dir or 'hub'} "
              f"| device {rt.device}")
    try:
        prepare_data(ctx, data_dir)
    except BaseException:  # a run that fails before training leaves no directory it made (only its lock)
        if out_dir in made:
            release_lock(out_dir / ".lock")
            shutil.rmtree(out_dir, ignore_errors=True)
        for parent in made[1:]:  # and no parent it made, unless another run (another plan run) uses it
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise

    ctx.log = open(out_dir / "log.jsonl", "a") if rt.is_master else None
    ctx.best = dict(score=-math.inf)  # best over the whole grid: this is the checkpoint on disk
    t_start = time.time()
    grid = {str(lr): train_one_lr(ctx, lr) for lr in args.lrs}
    best = ctx.best
    if rt.is_master:
        summarise(ctx, grid, round(time.time() - t_start, 1))
    if rt.is_ddp:
        torch.distributed.destroy_process_group()
    if rt.is_master and best.get("lr") is None:  # only the master evaluates
        raise SystemExit(f"no learning rate of --lr {args.lr} gave a model with finite weights and dev score "
                         f"(see {out_dir / 'log.jsonl'}); nothing was saved. Try lower learning rates.")
    if rt.is_master and not keep_lock:
        release_lock(lock)  # finished: eval.py leaves out only runs that still hold their lock (cut off)
    return best


def summarise(ctx, grid, wall_s):
    """The grid's summary: into log.jsonl, into the kept checkpoint's finetune.json, and printed."""
    args, best = ctx.args, ctx.best
    kept = best.get("lr") is not None
    summary = dict(task=ctx.task.name, metric=ctx.task.metric, best_lr=best.get("lr"),
                   best_score=best["score"] if kept else None, best_metrics=best.get("metrics"), grid=grid,
                   wall_s=wall_s, protocol=args.protocol)
    log_event(ctx.log, dict(event="summary", **summary))
    ctx.log.close()
    print(json.dumps(dict(best_lr=best.get("lr"), **(best.get("metrics") or {}))))
    if kept and not args.no_save:  # add the grid to the kept checkpoint's metadata
        meta = json.loads((ctx.out_dir / "finetune.json").read_text())
        best_run = grid[str(best["lr"])]  # the last evaluation's scores and each metric's own best
        meta.update(grid=grid, wall_s=wall_s, last_metrics=best_run["last_metrics"],
                    best_by_metric=best_run["best_by_metric"])
        write_json(ctx.out_dir / "finetune.json", meta)
        print(f"saved the best checkpoint (lr {best['lr']:g}, step {best['step']}, dev {ctx.task.metric} "
              f"{best['score']:.4f}) to {ctx.out_dir}")


RUN_FILES = ("finetune.json", "head.safetensors", "model.safetensors", "config.json", "tokenizer.json",
             "vocab.txt", "tokenizer_config.json", "log.jsonl", ".saving")  # what a run writes in --out_dir


def remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def clear_previous_run(out_dir, overwrite):
    """Refuse an --out_dir that holds a previous run (so that log.jsonl never mixes two runs and finetune.json
    describes the weights beside it), unless overwrite: then delete that run's files (only those), and the
    temporary files a killed save left."""
    previous = [out_dir / f for f in RUN_FILES if (out_dir / f).exists()]
    if previous and not overwrite:
        raise SystemExit(f"{out_dir} holds a previous run ({', '.join(str(f) for f in previous)}): pass "
                         "--overwrite to start afresh, or another --out_dir")
    for f in previous:
        remove(f)
    remove_stale_temp_files(out_dir)


# -----------------------------------------------------------------------------
# Seeds and plans


def run_seeds(args):
    """One run per seed, each in its own directory OUT_DIR/seedS; -> {seed: that run's best}."""
    out_dir = run_dir(args)
    return {seed: finetune(argparse.Namespace(**{**vars(args), "seed": seed,
                                                 "out_dir": str(out_dir / f"seed{seed}")}))
            for seed in args.seeds}


def run_plan(path):
    """Every model x task x seed of a JSON plan, into out_dir/MODEL/TASK/seedS, seed by seed and task by task
    (models innermost, so a plan cut short leaves every model with the same runs). Runs with done.json are
    skipped, so rerunning a cut-off plan continues it (the cut run restarts). Several processes may share a
    plan (e.g. two with `"args": ["--threads", "1"]`): each locks a run first, skipping those others hold."""
    plan = read_plan(path)
    models, tasks, seeds = plan["models"], plan["tasks"], plan.get("seeds", [42])
    root, extra = Path(plan.get("out_dir", "runs/downstream")), [str(a) for a in plan.get("args", [])]
    todo = [(m, t, s) for s in seeds for t in tasks for m in models]
    for i, (name, task, seed) in enumerate(todo):
        out = root / name / task / f"seed{seed}"
        where = f"[plan {i + 1}/{len(todo)}] {name} {task} seed {seed}"
        if (out / "done.json").exists():
            continue
        made = new_folders(out)
        try:
            lock = lock_out_dir(out, "plan run")
        except DirectoryInUse:  # another process works on this run
            print(f"{where}: another process runs it, skipped", flush=True)
            continue
        if (out / "done.json").exists():  # finished between the check and the lock
            release_lock(lock)
            continue
        print(f"{where} -> {out}", flush=True)
        for leftover in out.iterdir():  # a cut-off run: start it again (keep only our lock)
            if leftover != lock:
                remove(leftover)
        t0 = time.time()
        model = ["--model", str(models[name])] if models[name] else []  # null: the embedded teacher
        args = parse_args(["--task", task, *model, "--seed", str(seed), "--out_dir", str(out), *extra])
        best = finetune(args, keep_lock=True, made=made)
        done = dict(model=name, task=task, seed=seed, wall_s=round(time.time() - t0, 1),
                    best_lr=best.get("lr"), score=best.get("score"))
        write_json(out / "done.json", done)
        release_lock(lock)  # only now: a run without done.json and without a live lock is restarted
    return root


def read_plan(path):
    """A --plan file, checked before anything is created: {models: {name: path or null}, tasks: [task, ...],
    seeds: [int, ...], out_dir: str, args: [...]} (seeds, out_dir and args optional)."""
    shape = "{models: {name: path}, tasks: [...], seeds: [...], out_dir, args: [...]}"
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--plan {path}: cannot read a JSON plan {shape} ({type(e).__name__}: {e})") \
            from None
    plan = plan if isinstance(plan, dict) else {}

    def is_list_of(key, kind):
        return isinstance(plan.get(key), list) and plan[key] and all(type(x) is kind for x in plan[key])
    bad = [] if "models" in plan and "tasks" in plan else ["models and tasks are required"]
    if not isinstance(plan.get("models", {}), dict) or not all(
            isinstance(v, str) or v is None for v in plan.get("models", {}).values()):
        bad.append("models must be an object {name: path or null}")
    if "tasks" in plan and not is_list_of("tasks", str):
        bad.append("tasks must be a list of task names")
    if "seeds" in plan and not is_list_of("seeds", int):
        bad.append("seeds must be a list of integers")
    if not isinstance(plan.get("out_dir", ""), str) or not isinstance(plan.get("args", []), list):
        bad.append("out_dir must be a path and args a list")
    if bad:
        raise SystemExit(f"--plan {path}: {'; '.join(bad)} (expected {shape})")
    for task in plan["tasks"]:
        try:
            get_task(task)
        except ValueError as e:
            raise SystemExit(f"--plan {path}: {e}") from None
    missing = [m for m in plan["models"].values()
               if m and minimoe.looks_local(m) and not Path(m).expanduser().exists()]
    if missing:
        raise SystemExit(f"--plan {path}: no such model {', '.join(missing)}")
    return plan


# -----------------------------------------------------------------------------
# Arguments and main


# Recipes. "ours" is the module docstring's. "authors" is that of the authors' public finetuning code
# (GLUE: GeneZC/StarK scripts; CoNLL: GeneZC/MiniDisc): batch 16, grad clip 5.0, dev evaluation every 10
# steps keeping the best, early stopping after 5 epochs without a better dev score; CoNLL lr 2e-5,
# batch 32, 3 epochs, evaluation every 100 steps. A flag given on the command line wins over the preset.
PROTOCOLS = {
    "ours": dict(lr="3e-5", batch_size=32, epochs=10, warmup=0.1, weight_decay=0.01, grad_clip=1.0,
                 eval_every=0, patience=3, patience_unit="evals"),
    "authors": dict(lr="3e-5", batch_size=16, epochs=10, warmup=0.1, weight_decay=0.01, grad_clip=5.0,
                    eval_every=10, patience=5, patience_unit="epochs"),
    "authors-ner": dict(lr="2e-5", batch_size=32, epochs=3, warmup=0.1, weight_decay=0.01, grad_clip=5.0,
                        eval_every=100, patience=0, patience_unit="epochs"),
}


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default=None, help=f"one of {sorted(TASKS)} (required unless --plan)")
    p.add_argument("--protocol", default="ours", choices=["ours", "authors"],
                   help="recipe preset (PROTOCOLS): ours, or the authors' (batch 16, clip 5, dev every 10 "
                   "steps, patience 5 epochs; CoNLL: lr 2e-5, batch 32, 3 epochs, dev every 100 steps); "
                   "flags given explicitly win")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: one run each, in OUT_DIR/seedS")
    p.add_argument("--plan", default=None, help="a JSON plan {models: {name: path}, tasks: [...], seeds: "
                   "[...], out_dir, args: [...]}: every model x task x seed into out_dir/name/task/seedS "
                   "(rerun to continue)")
    p.add_argument("--model", default=None, help="HF BERT dir or hub id, save_bert dir, or train_distill "
                   "*.pt; None = all-MiniLM-L6-v2")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir; None = the --model dir (give it for a *.pt file)")
    p.add_argument("--data_dir", default=default_data_dir(), help="$MINIMOE_DATA: GLUE/CoNLL root "
                   "(DIR/glue/RTE/train.tsv, DIR/conll2003/train.txt) or a task folder; 'hub' = download "
                   "with `datasets`")
    p.add_argument("--train_file", default=None, help="labelled training file (overrides --data_dir)")
    p.add_argument("--dev_file", default=None,
                   help="labelled dev file (overrides --data_dir; one file, also for MNLI)")
    p.add_argument("--out_dir", default=None, help="best checkpoint + log.jsonl; None = runs/finetune/TASK")
    p.add_argument("--lr", default=None,
                   help="learning rate, or a comma-separated grid (best dev score kept)")
    p.add_argument("--epochs", type=POSITIVE, default=None, help="early stopping usually ends sooner")
    p.add_argument("--max_steps", type=NONNEGATIVE_INT, default=0,
                   help="cap on optimizer steps per lr (0 = none)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=None,
                   help="per process (DDP: times the world size)")
    p.add_argument("--eval_batch_size", type=POSITIVE_INT, default=64)
    p.add_argument("--max_length", type=number(int, low=3), default=128)
    p.add_argument("--warmup", type=FRACTION, default=None, help="fraction of steps with linear warmup")
    p.add_argument("--weight_decay", type=NONNEGATIVE, default=None)
    p.add_argument("--grad_clip", type=NONNEGATIVE, default=None)
    p.add_argument("--load_balance_weight", type=NONNEGATIVE, default=0.01,
                   help="weight of the MoE load-balancing loss")
    p.add_argument("--eval_every", type=NONNEGATIVE_INT, default=None,
                   help="evaluate every N steps (0 = every epoch)")
    p.add_argument("--patience", type=NONNEGATIVE_INT, default=None,
                   help="stop after N --patience_unit without a better dev score (0 = never)")
    p.add_argument("--patience_unit", default=None, choices=["evals", "epochs"],
                   help="what --patience counts")
    p.add_argument("--no_group_by_length", action="store_true",
                   help="plain random batches (more padding, slower)")
    p.add_argument("--no_pooler_init", action="store_true",
                   help="random pooler even if the checkpoint has one")
    p.add_argument("--pooling", default="cls", choices=["cls", "mean"],
                   help="pooler input: [CLS] (BERT) or the tokens' mean (sentence-embedding models)")
    p.add_argument("--max_train_examples", type=NONNEGATIVE_INT, default=0, help="only the first N (0 = all)")
    p.add_argument("--threads", type=NONNEGATIVE_INT, default=0,
                   help="0 = torch's default; 1 is faster on a shared CPU")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (as train_distill.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--log_every", type=POSITIVE_INT, default=50)
    p.add_argument("--no_save", action="store_true",
                   help="do not write the checkpoint (log and summary only)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous run in --out_dir and start afresh")
    p.add_argument("--debug", action="store_true", help="a traceback for every error, user errors included")
    return p


def parse_args(argv=None):
    """The command line, with the protocol's preset filling the flags it left out, --seeds and --lr parsed."""
    p = make_parser()
    args = p.parse_args(argv)
    if args.plan:
        return args
    if not args.task:
        p.error("--task is required (or give --plan)")
    ner = args.protocol == "authors" and args.task.lower() == "conll"
    preset = PROTOCOLS["authors-ner" if ner else args.protocol]
    for k, v in preset.items():  # the preset fills what the command line left out
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seeds:
        try:
            args.seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            p.error(f"argument --seeds: comma-separated integers, got {args.seeds!r}")
    try:
        args.lrs = [NONNEGATIVE(x) for x in str(args.lr).split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(f"argument --lr: each learning rate {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        return run_plan(args.plan)
    if args.seeds:  # one run per seed, each in its own directory
        return run_seeds(args)
    return finetune(args)


if __name__ == "__main__":
    run_script(main)
