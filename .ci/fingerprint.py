"""A bitwise fingerprint of the project's behaviour, for restructuring without changing it.

    python .ci/fingerprint.py --out before.json            # on the old tree
    python .ci/fingerprint.py --out after.json --compare before.json

Hashes (sha256 of raw bytes): model init, outputs, gradients and the RNG stream after them, for dense, MoE,
attention-expert and compressed students in both dispatch paths; a 3-step two-student distillation through the
command line (its log.jsonl without timings, its students' weights, its held-out scores); a short finetune
(scores, weights); and eval.py's tables over committed runs. Runs on one thread, from any working directory.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# the tree under test: --root DIR (default: the checkout this file is in), read before minimoe is imported
ROOT = Path(sys.argv[sys.argv.index("--root") + 1] if "--root" in sys.argv else Path(__file__).parents[1]).resolve()
sys.path.insert(0, str(ROOT))
os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402

import minimoe as mm  # noqa: E402

TIMING = {"tok_per_s", "elapsed", "wall_s", "step_s", "time", "elapsed_s", "peak_mem_mb", "peak_rss_mb", "s_per_step"}


def scrub(obj, *roots):
    """obj without timings, with the given directories' paths made relative (so two trees compare)."""
    if isinstance(obj, dict):
        return {k: scrub(v, *roots) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [scrub(v, *roots) for v in obj]
    if isinstance(obj, str):
        for r in roots:
            obj = obj.replace(str(r), "<root>")
    return obj


def h(*tensors):
    d = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            d.update(t.detach().contiguous().cpu().numpy().tobytes())
        else:
            d.update(repr(t).encode())
    return d.hexdigest()[:16]


def model_prints():
    torch.set_num_threads(1)
    out = {}
    cfgs = {"dense": dict(num_experts=1), "moe4": dict(num_experts=4), "attn2_moe2": dict(num_experts=2, num_attn_experts=2),
            "moe4_layer": dict(num_experts=4, relation_head="layer"), "moe4_indep": dict(num_experts=4, expert_init="independent")}
    for name, kw in cfgs.items():
        for dispatch in ("loop", "grouped"):
            torch.manual_seed(776)
            cfg = mm.BertConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                                max_position_embeddings=64, dispatch=dispatch, **kw)
            model = mm.Bert(cfg)
            ids = torch.randint(5, 1000, (3, 17))
            mask = torch.ones(3, 17, dtype=torch.long)
            mask[1, 12:] = 0
            types = torch.zeros_like(ids)
            types[:, 9:] = 1
            init = h(*model.state_dict().values())
            model.train()
            o = model(ids, mask, types)
            t = [x.detach() * 1.1 for x in o.qkv]
            loss = mm.relation_loss(t, o.qkv, mask, num_relation_heads=4) + 0.01 * o.aux_loss
            loss.backward()
            grads = h(*[p.grad if p.grad is not None else torch.zeros(0) for p in model.parameters()])
            out[f"{name}/{dispatch}"] = dict(init=init, out=h(o.last_hidden_state, *o.qkv, o.aux_loss),
                                            loss=h(loss), grads=grads, rng=h(torch.rand(8)))
            if name == "moe4":
                model.eval()
                small = mm.compress_experts(model, 8, "shared").eval()
                with torch.no_grad():
                    out[f"{name}/{dispatch}/compressed"] = h(small(ids, mask, types).last_hidden_state)
    return out


def run(args, cwd):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def distill_prints(tmp):
    tok = mm.load_tokenizer(mm.default_teacher())
    torch.manual_seed(0)
    cfg = mm.BertConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
                        initializer_range=0.3)
    mm.save_bert(mm.Bert(cfg), tmp / "teacher", tok)
    words = "the cat sat on a mat while two dogs ran past the old house near some river bank".split()
    g = torch.Generator().manual_seed(0)
    lines = []
    for doc in range(30):
        for _ in range(6):
            lines.append(" ".join(words[i] for i in torch.randint(len(words), (12,), generator=g)) + ".")
        lines.append("")
    (tmp / "corpus.txt").write_text("\n".join(lines))
    out = tmp / "distill"
    run([str(ROOT / "train_distill.py"), "--teacher", str(tmp / "teacher"), "--corpus", str(tmp / "corpus.txt"),
         "--cache_dir", str(tmp / "cache"), "--out_dir", str(out), "--layers", "2", "--hidden", "32", "--heads", "4",
         "--num_relation_heads", "4", "--max_seq_length", "32", "--batch_size", "8", "--eval_pairs", "16",
         "--heldout", "0.1", "--max_steps", "3", "--log_every", "1", "--eval_every", "2", "--save_every", "2",
         "--students", "a=1,1", "b=1,4", "--num_proc", "1"], tmp)
    log = [scrub(json.loads(x), tmp) for x in (out / "log.jsonl").read_text().splitlines()]
    res = json.loads((out / "results.json").read_text())
    weights = {n: hashlib.sha256((out / n / "student" / "model.safetensors").read_bytes()).hexdigest()[:16]
               for n in ("a", "b")}
    evals = scrub({k: v for k, v in res.items() if "heldout" in k or k == "students"}, tmp)
    return dict(log=h(json.dumps(log, sort_keys=True)), weights=weights, heldout=h(json.dumps(evals, sort_keys=True,
                                                                                                default=str)))


def finetune_prints(tmp):
    tok = mm.load_tokenizer(mm.default_teacher())
    torch.manual_seed(0)
    mm.save_bert(mm.Bert(mm.BertConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, num_experts=4)),
                 tmp / "enc", tokenizer=tok)
    pos, neg = ["a good film", "good and fun", "so good"], ["a bad film", "bad and dull", "so bad"]
    rows = [(s, 1) for s in pos] + [(s, 0) for s in neg]
    d = tmp / "SST-2"
    d.mkdir()
    for split, n in (("train", 36), ("dev", 12)):
        (d / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{rows[i % 6][0]} {i}\t{rows[i % 6][1]}\n"
                                                                        for i in range(n)))
    out = tmp / "ft"
    run([str(ROOT / "finetune.py"), "--task", "sst2", "--model", str(tmp / "enc"), "--data_dir", str(d), "--out_dir",
         str(out), "--lr", "1e-3,3e-3", "--epochs", "2", "--batch_size", "8", "--eval_every", "3", "--precision", "fp32",
         "--threads", "1"], tmp)
    meta = json.loads((out / "finetune.json").read_text())
    log = [scrub(json.loads(x), tmp) for x in (out / "log.jsonl").read_text().splitlines()]
    return dict(metrics=meta["metrics"], grid=h(json.dumps(scrub(meta.get("grid"), tmp), sort_keys=True)),
                log=h(json.dumps(log, sort_keys=True)),
                weights=hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16])


def eval_prints(tmp):
    runs = [f"results/downstream/runs/{m}" for m in ("minilm", "moe4", "random")]
    run([str(ROOT / "eval.py"), "--tasks", "mrpc,stsb,rte,cola,conll", "--runs", *runs, "--cached", "--json",
         str(tmp / "t.json"), "--threads", "1"], ROOT)
    t = json.loads((tmp / "t.json").read_text())
    t.pop("command", None)
    md = t.pop("markdown", "")
    return dict(table=h(json.dumps(scrub(t, tmp), sort_keys=True, default=str)), markdown=h(md))


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--compare", default=None)
    p.add_argument("--root", default=None, help="the tree to fingerprint (default: this checkout)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp = dict(models=model_prints())
        for name, fn in (("distill", distill_prints), ("finetune", finetune_prints), ("eval", eval_prints)):
            (tmp / name).mkdir()
            fp[name] = fn(tmp / name)
    Path(a.out).write_text(json.dumps(fp, indent=1, sort_keys=True))
    if a.compare:
        old = json.loads(Path(a.compare).read_text())
        fo, fn_ = flatten(old), flatten(fp)
        diffs = sorted(k for k in set(fo) | set(fn_) if fo.get(k) != fn_.get(k))
        print(f"{len(diffs)} differences in {len(set(fo) | set(fn_))} fingerprints")
        for k in diffs:
            print(f"  {k}: {fo.get(k)} -> {fn_.get(k)}")
        sys.exit(1 if diffs else 0)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
