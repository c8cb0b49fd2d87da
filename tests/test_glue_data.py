"""Readers of finetune.py: real GLUE / CoNLL-2003 files (from ../shared/data, skipped when absent),
MNLI/QQP layouts on small files written here, clear errors on bad input, tokenisation, and the
NER word <-> sub-word label alignment."""
import collections
import time

import pytest

import eval as ev
import finetune as ft

# canonical rows and label counts (shared/data/README.md); None = only the label set is checked
GLUE = [
    ("cola", "train", 8551, None), ("cola", "dev", 1043, {1: 721, 0: 322}),
    ("sst2", "train", 67349, None), ("sst2", "dev", 872, {1: 444, 0: 428}),
    ("mrpc", "train", 3668, None), ("mrpc", "dev", 408, {1: 279, 0: 129}),
    ("stsb", "train", 5749, None), ("stsb", "dev", 1500, None),
    ("qnli", "dev", 5463, {0: 2702, 1: 2761}),
    ("rte", "train", 2490, None), ("rte", "dev", 277, {0: 146, 1: 131}),
    ("wnli", "train", 635, None), ("wnli", "dev", 71, None),
]


@pytest.mark.parametrize("task,split,rows,counts", GLUE, ids=[f"{t}-{s}" for t, s, _, _ in GLUE])
def test_glue_reader_real_files(shared_data, task, split, rows, counts):
    t = ft.get_task(task)
    ex = ft.load_examples(t, split, str(shared_data))
    assert len(ex) == rows
    assert all(isinstance(e.a, str) and e.a for e in ex)
    assert all((e.b is None) == (t.columns[1] is None) for e in ex)
    labels = [e.label for e in ex]
    if t.kind == "reg":
        assert all(isinstance(x, float) and 0.0 <= x <= 5.0 for x in labels)
        assert len(set(labels)) > 50
    else:
        assert set(labels) == set(range(len(t.labels)))
    if counts:
        assert dict(collections.Counter(labels)) == counts


def test_stray_quotes_are_text(shared_data):
    """GLUE is not quoted CSV: MRPC/QNLI rows with unbalanced quotes stay one row each."""
    mrpc = ft.load_examples(ft.get_task("mrpc"), "dev", str(shared_data))
    assert mrpc[0].b.startswith('"The foodservice')  # opening quote, never closed
    qnli = ft.load_examples(ft.get_task("qnli"), "dev", str(shared_data))
    assert sum(e.b.startswith('" ') for e in qnli) >= 1


CONLL = [("train", 14041, dict(LOC=7140, MISC=3438, ORG=6321, PER=6600)),
         ("dev", 3250, dict(LOC=1837, MISC=922, ORG=1341, PER=1842)),
         ("test", 3453, dict(LOC=1668, MISC=702, ORG=1661, PER=1617))]


@pytest.mark.parametrize("split,sentences,entities", CONLL, ids=[c[0] for c in CONLL])
def test_conll_reader_real_files(shared_data, split, sentences, entities):
    ex = ft.load_examples(ft.get_task("conll"), split, str(shared_data))
    assert len(ex) == sentences
    assert all(len(e.a) == len(e.label) for e in ex)
    for e in ex:  # IOB2: every entity starts with B-
        for prev, tag in zip(["O"] + e.label[:-1], e.label):
            assert not (tag.startswith("I-") and prev[2:] != tag[2:]), (e.a, e.label)
    counts = collections.Counter(typ for e in ex for typ, _, _ in ft.entities(e.label))
    assert dict(counts) == entities  # the CoNLL-2003 paper's entity counts


def test_iob1_to_iob2():
    assert ft.iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG"]


# --- MNLI and QQP (not in shared/data): small files in the GLUE layout --------------------------

MNLI_TRAIN_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                   "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                 "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
QQP_HEAD = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"


def write(path, lines, end="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return path


def mnli_row(i, s1, s2, gold, dev=False):
    votes = [gold] * 5 if dev else [gold]
    return "\t".join([str(i), "31193", f"{i}n", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2,
                      *votes, gold])


@pytest.fixture
def glue_dir(tmp_path):
    root = tmp_path / "glue_data"
    write(root / "MNLI" / "train.tsv", [MNLI_TRAIN_HEAD] + [mnli_row(i, f'He said "hi {i}', "yes.", lab)
                                                            for i, lab in enumerate(["neutral", "entailment", "contradiction"] * 3)])
    write(root / "MNLI" / "dev_matched.tsv", [MNLI_DEV_HEAD, mnli_row(0, "a", "b", "entailment", True),
                                              mnli_row(1, "c", "d", "neutral", True)])
    write(root / "MNLI" / "dev_mismatched.tsv", [MNLI_DEV_HEAD, mnli_row(0, "e", "f", "contradiction", True)])
    write(root / "QQP" / "train.tsv", [QQP_HEAD, '1\t1\t2\tWhat is "love?\tWhy?\t0', "2\t3\t4\tHow?\tHow so?\t1",
                                       "3\t5\t6\tWho's there\t\"Who\" is there\t1"])
    write(root / "QQP" / "dev.tsv", [QQP_HEAD, "7\t8\t9\tq1\tq2\t1"], end="")  # no trailing newline
    return root


def test_mnli_reader(glue_dir):
    t = ft.get_task("mnli")
    train = ft.load_examples(t, "train", str(glue_dir))
    assert len(train) == 9
    assert train[0] == ft.Example('He said "hi 0', "yes.", t.labels.index("neutral"))
    assert {e.label for e in train} == {0, 1, 2}
    m = ft.load_examples(t, "dev_matched", str(glue_dir))
    mm = ft.load_examples(t, "dev_mismatched", str(glue_dir / "MNLI"))  # a task folder works too
    assert [e.label for e in m] == [t.labels.index("entailment"), t.labels.index("neutral")]
    assert [e.label for e in mm] == [t.labels.index("contradiction")]
    assert t.dev == ("dev_matched", "dev_mismatched")


def test_qqp_reader(glue_dir):
    t = ft.get_task("qqp")
    train = ft.load_examples(t, "train", str(glue_dir))
    assert [(e.a, e.b, e.label) for e in train] == [('What is "love?', "Why?", 0), ("How?", "How so?", 1),
                                                    ("Who's there", '"Who" is there', 1)]
    assert len(ft.load_examples(t, "dev", str(glue_dir))) == 1


# --- bad input: clear errors naming the file and the line ---------------------------------------

def test_missing_column_in_header(tmp_path):
    p = write(tmp_path / "train.tsv", ["index\tsentence1\tsentence2", "0\ta\tb"])
    with pytest.raises(ValueError, match=rf"{p}:1: header lacks column\(s\) \['label'\]"):
        ft.read_glue(ft.get_task("rte"), p)


def test_missing_column_in_row(tmp_path):
    p = write(tmp_path / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta b\tentailment"])
    with pytest.raises(ValueError, match=rf"{p}:3: expected 4 tab-separated columns, found 3"):
        ft.read_glue(ft.get_task("rte"), p)


def test_unknown_label(tmp_path):
    p = write(tmp_path / "dev.tsv", ["sentence\tlabel", "good\t1", "bad\t0", "meh\tneutral"])
    with pytest.raises(ValueError, match=rf"{p}:4: unknown label 'neutral' for sst2"):
        ft.read_glue(ft.get_task("sst2"), p)


def test_bad_score(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    p = write(tmp_path / "dev.tsv", [head, "0\tg\tf\t2012\t0\tn\tn\ta\tb\t4.5", "1\tg\tf\t2012\t0\tn\tn\ta\tb\tfive"])
    with pytest.raises(ValueError, match=rf"{p}:3: score 'five' is not a number"):
        ft.read_glue(ft.get_task("stsb"), p)


def test_cola_row_without_sentence(tmp_path):
    p = write(tmp_path / "train.tsv", ["gj04\t1\t\tFine.", "gj04\t0\t*"])
    with pytest.raises(ValueError, match=rf"{p}:2: expected 4 tab-separated columns, found 3"):
        ft.read_glue(ft.get_task("cola"), p)


def test_empty_and_header_only_files(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"{empty}: file is empty"):
        ft.read_glue(ft.get_task("sst2"), empty)
    head = write(tmp_path / "head.tsv", ["sentence\tlabel"])
    with pytest.raises(ValueError, match=rf"{head}: header but no data rows"):
        ft.read_glue(ft.get_task("sst2"), head)
    blank = write(tmp_path / "blank.txt", ["", "  "])
    with pytest.raises(ValueError, match=rf"{blank}: file is empty"):
        ft.read_conll(blank)


def test_stray_quotes_do_not_break_parsing(tmp_path):
    texts = ['"unbalanced quote', 'a "quoted" word', 'ends with quote"', '""', "it 's \"fine\""]
    p = write(tmp_path / "train.tsv", ["sentence\tlabel"] + [f"{x}\t{i % 2}" for i, x in enumerate(texts)])
    ex = ft.read_glue(ft.get_task("sst2"), p)
    assert [e.a for e in ex] == texts and [e.label for e in ex] == [0, 1, 0, 1, 0]


def test_crlf_and_bom(tmp_path):
    p = tmp_path / "dev.tsv"
    p.write_bytes("\ufeffsentence\tlabel\r\nok\t1\r\nno\t0\r\n".encode("utf-8"))
    ex = ft.read_glue(ft.get_task("sst2"), p)
    assert [(e.a, e.label) for e in ex] == [("ok", 1), ("no", 0)]


def test_conll_errors(tmp_path):
    p = write(tmp_path / "train.txt", ["-DOCSTART- -X- -X- O", "", "EU NNP I-NP I-ORG", "rejects VBZ I-VP I-FOO"])
    with pytest.raises(ValueError, match=rf"{p}:4: unknown NER tag 'I-FOO'"):
        ft.read_conll(p)
    q = write(tmp_path / "dev.txt", ["EU NNP I-NP I-ORG", "lonely"])
    with pytest.raises(ValueError, match=rf"{q}:2: expected 'word ... TAG' columns"):
        ft.read_conll(q)


def test_missing_files_name_the_place(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train file for rte under"):
        ft.load_examples(ft.get_task("rte"), "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.tsv: no such file"):
        ft.read_glue(ft.get_task("rte"), tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        ft.get_task("glue")


def test_hub_offline_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(ft, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.time()
    with pytest.raises(ConnectionError, match="--data_dir"):
        ft.load_examples(ft.get_task("rte"), "dev", data_dir=None)
    with pytest.raises(ConnectionError, match="eriktks/conll2003"):
        ft.load_examples(ft.get_task("conll"), "train", data_dir=None)
    assert time.time() - t0 < 5


def test_hub_probe_returns_quickly():
    t0 = time.time()
    ft.hub_reachable(timeout=2.0)  # True online, False offline; never hangs
    assert time.time() - t0 < 10


# --- tokenisation, dynamic padding, NER alignment ----------------------------------------------

@pytest.fixture(scope="module")
def tok():
    minimoe = pytest.importorskip("minimoe")
    try:
        return minimoe.load_tokenizer(minimoe.default_teacher())
    except ImportError as e:
        pytest.skip(str(e))


def test_pair_encoding_truncates_and_pads_dynamically(tok):
    t = ft.get_task("rte")
    ex = [ft.Example("word " * 200, "short hypothesis.", 0), ft.Example("A cat.", "A dog.", 1)]
    f = ft.encode(t, ex, tok, max_length=32)
    assert len(f[0].ids) == 32 and len(f[1].ids) < 32
    assert f[0].ids[0] == tok.token_to_id("[CLS]") and f[0].ids[-1] == tok.token_to_id("[SEP]")
    assert f[0].types[-1] == 1 and f[0].types[0] == 0  # segment B kept
    b = ft.collate_features(f, pad_id=0)
    assert b["input_ids"].shape == (2, 32) and b["attention_mask"][1].sum() == len(f[1].ids)
    b = ft.collate_features(f[1:], pad_id=0)
    assert b["input_ids"].shape == (1, len(f[1].ids))  # padded to the batch's longest, not to 128
    assert b["labels"].tolist() == [1]


def test_ner_alignment_round_trip(tok):
    t = ft.get_task("conll")
    words = ["Schwarzenegger", "visited", "Ouagadougou", "in", "1998", "."]
    tags = ["B-PER", "O", "B-LOC", "O", "O", "O"]
    (f,) = ft.encode(t, [ft.Example(words, None, tags)], tok, max_length=128)
    assert len(f.ids) > len(words) + 2  # some words split into several sub-words
    ids = [t.labels.index(x) for x in tags]
    assert [x for x in f.label if x != -100] == ids  # exactly one label per word, in order
    assert f.label[0] == -100 and f.label[-1] == -100  # [CLS], [SEP]
    back = ft.word_predictions(f.word_ids, [max(x, 0) for x in f.label], len(words), fill=-1)
    assert back == ids
    # a continuation sub-word's prediction is ignored: labels come from first sub-words only
    noisy = [x if x != -100 else 7 for x in f.label]
    assert ft.word_predictions(f.word_ids, noisy, len(words), fill=-1) == ids


def test_ner_alignment_round_trip_real(shared_data, tok):
    t = ft.get_task("conll")
    ex = ft.load_examples(t, "dev", str(shared_data))[:400]
    feats = ft.encode(t, ex, tok, max_length=128)
    for e, f in zip(ex, feats):
        ids = [t.labels.index(x) for x in e.label]
        assert ft.word_predictions(f.word_ids, [max(x, 0) for x in f.label], len(e.a), 0) == ids
    # truncation: words cut off get the fill value
    (f,) = ft.encode(t, [ex[0]], tok, max_length=4)
    back = ft.word_predictions(f.word_ids, [max(x, 0) for x in f.label], len(ex[0].a), fill=-1)
    assert back[2:] == [-1] * (len(ex[0].a) - 2)
