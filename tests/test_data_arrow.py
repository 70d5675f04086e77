"""Arrow-backed data: batches identical to the list-based pipeline it replaced
(tests/fixtures/data_batches.json, captured from that code by
tests/fixtures/make_data_batches.py), the tokenization cache, bounded evaluation
and resuming mid-epoch."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from engine.batching import BatchStream, as_rows, eval_sample, gather
from engine.config import DatasetConfig
from engine.data import load_examples
from engine.models import load_tokenizer
from engine.tokens import tokenize_examples

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "data_batches.json").read_text())
DATASETS = {"sentiment": ("demo-sentiment", "classification"), "instruct": ("demo-instruct", "causal_lm"),
            "instruct-chat": ("demo-instruct", "causal_lm")}


def digest(batch):
    d = hashlib.sha256()
    for k in ("input_ids", "attention_mask", "labels"):
        t = batch[k]
        d.update(k.encode())
        d.update(str(tuple(t.shape)).encode())
        d.update(t.numpy().tobytes())
    return d.hexdigest()[:16]


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer("tiny-bert")


@pytest.mark.parametrize("case", sorted(FIXTURE["cases"]))
def test_batches_identical_to_the_list_pipeline(case, bert_tok, tmp_path):
    import copy
    name, max_len, bs, seed = case.split("/")
    max_len, bs, seed = int(max_len), int(bs), int(seed)
    ds, task = DATASETS[name]
    tok = copy.deepcopy(bert_tok)
    if name.endswith("chat"):
        tok.chat_template = FIXTURE["template"]
    want = FIXTURE["cases"][case]
    ex = load_examples(DatasetConfig(name=ds), task, cache_dir=tmp_path)
    data = tokenize_examples(ex, tok, max_len, cache_dir=tmp_path)
    s = BatchStream(data.train, bs, tok.pad_token_id, seed)
    got = [s.next() for _ in range(len(want["train"]))]
    assert {k: v.tolist() for k, v in got[0].items()} == want["first"]
    assert [digest(b) for b in got] == want["train"]          # crosses into the second epoch
    s2 = BatchStream(data.train, bs, tok.pad_token_id, seed)
    s2.restore({"epoch": 1, "index": 2 * bs})
    assert [digest(s2.next()) for _ in range(3)] == want["resumed_epoch1_index2"]
    rows = as_rows(data.validation)
    assert [digest(gather(rows, np.arange(i, min(i + bs, len(rows))), tok.pad_token_id))
            for i in range(0, len(rows), bs)] == want["eval"]


def _prepare(tok, tmp_path, max_len=32, progress=None):
    ex = load_examples(DatasetConfig(name="demo-sentiment"), "classification", cache_dir=tmp_path,
                       on_progress=progress)
    return tokenize_examples(ex, tok, max_len, cache_dir=tmp_path, on_progress=progress)


def test_cache_hit_on_rerun_and_miss_when_tokenizer_or_length_changes(bert_tok, tmp_path):
    import copy
    calls = []
    first = _prepare(bert_tok, tmp_path, progress=lambda *a: calls.append(a))
    assert calls[-1] == ("validation", 1500, 1500)    # progress counts train + validation rows
    assert first.train.features["input_ids"].feature.dtype == "uint16"
    calls.clear()
    again = _prepare(bert_tok, tmp_path, progress=lambda *a: calls.append(a))
    assert not calls and again.fingerprint == first.fingerprint      # nothing read or tokenized again
    assert again.train.cache_files[0]["filename"].startswith(str(tmp_path / "tokens" / first.fingerprint))
    longer = _prepare(bert_tok, tmp_path, max_len=40)
    other = copy.deepcopy(bert_tok)
    other.chat_template = "{{ messages[0]['content'] }}"
    retok = _prepare(other, tmp_path)
    assert len({first.fingerprint, longer.fingerprint, retok.fingerprint}) == 3
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == sorted(
        [first.fingerprint, longer.fingerprint, retok.fingerprint])
    assert len(list((tmp_path / "examples").iterdir())) == 1          # the mapped text is shared


def test_cache_misses_when_the_file_changes(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    a = load_examples(DatasetConfig(path=str(p)), "classification", cache_dir=tmp_path / "c")
    p.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(21)))
    b = load_examples(DatasetConfig(path=str(p)), "classification", cache_dir=tmp_path / "c")
    assert a.fingerprint != b.fingerprint and len(b.train) + len(b.validation) == 21


def test_eval_sample_is_reproducible_and_bounded():
    a, b = eval_sample(10_000, 2000, 7), eval_sample(10_000, 2000, 7)
    assert (a == b).all() and len(set(a.tolist())) == 2000 and (np.diff(a) > 0).all()
    assert not (a == eval_sample(10_000, 2000, 8)).all()
    assert (eval_sample(300, 2000, 0) == np.arange(300)).all() and len(eval_sample(300, None, 0)) == 300


def _run(overrides: dict, **kw):
    from engine.config import parse_run_config
    from engine.prepare import prepare_run
    from engine.train import train

    cfg = parse_run_config({"model": "tiny-bert", "dataset": {"name": "demo-sentiment"},
                            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                            "training": {"max_steps": 4, "batch_size": 4, "max_seq_len": 32, "eval_every": 2,
                                         **overrides}})
    return train(prepare_run(cfg), **kw)


@pytest.mark.slow   # three short runs: ~20 s on two busy cores
def test_bounded_evaluation_and_resume_mid_epoch():
    cfg = {"max_steps": 6, "eval_every": 3, "eval_max_rows": 50}
    straight = _run(cfg)
    assert [h["eval"]["eval_rows"] for h in straight.history if h["eval"]] == [50, 50]
    n = {"calls": 0}

    def stop():
        n["calls"] += 1
        return n["calls"] > 3     # cancelled after 3 steps, mid-epoch
    first = _run(cfg, should_stop=stop)
    assert first.cancelled and first.last_state["data"] == {"epoch": 0, "index": 12}
    assert first.history[2]["eval"] == straight.history[2]["eval"]      # the same sample each time
    rest = _run({**cfg, "eval_full": True}, resume_state=first.last_state)
    losses = [h["loss"] for h in first.history + rest.history]
    assert losses == pytest.approx([h["loss"] for h in straight.history], abs=1e-6)
    assert rest.eval["eval_rows"] == 300 and rest.eval["eval_loss"] != straight.eval["eval_loss"]


WORDS = "good bad fine great awful plot actor scene movie long short boring fun dull sharp warm".split()


def write_reviews(path, n: int, seed: int = 0) -> None:
    """`n` rows of 12-word reviews with a 0/1 label, written in blocks."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write("text,label\n")
        for lo in range(0, n, 50_000):
            k = min(50_000, n - lo)
            words = np.asarray(WORDS)[rng.integers(0, len(WORDS), size=(k, 12))]
            labels = rng.integers(0, 2, size=k)
            f.write("".join(" ".join(w) + f",{y}\n" for w, y in zip(words, labels)))


TRAIN_5_STEPS = """
import json, resource, sys
from engine.config import parse_run_config
from engine.prepare import prepare_run
from engine.train import train
cfg = parse_run_config({"model": "tiny-bert", "dataset": {"path": sys.argv[1]},
                        "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                        "training": {"max_steps": 5, "batch_size": 8, "max_seq_len": 32, "eval_every": 0,
                                     "eval_max_rows": 200}})
def peak_rss_mb():
    # VmHWM belongs to this process's own address space; ru_maxrss would also count the
    # parent's RSS at fork time (Linux carries it over exec), i.e. the pytest process's
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
data = []    # every (stage, rows done, rows in all) the data preparation reports
r = train(prepare_run(cfg, data_cache_dir=sys.argv[2], on_data_progress=lambda *a: data.append(a)))
print(json.dumps({"steps": r.steps, "eval_rows": r.eval["eval_rows"], "data": data, "maxrss_mb": peak_rss_mb()}))
"""


@pytest.mark.slow   # two fresh processes that import torch; ~25 s on two busy cores
def test_200k_row_csv_trains_5_steps_in_bounded_memory_and_reruns_from_the_cache(tmp_path):
    import subprocess
    import sys
    csv = tmp_path / "reviews.csv"
    write_reviews(csv, 200_000)
    runs = []
    for _ in range(2):   # a first run, then one from the cache
        out = subprocess.run([sys.executable, "-c", TRAIN_5_STEPS, str(csv), str(tmp_path / "cache")],
                             capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["steps"] == runs[1]["steps"] == 5 and runs[0]["eval_rows"] == 200
    assert max(r["maxrss_mb"] for r in runs) < 800, runs
    # the first run read the CSV and tokenized all 200k rows; the second read and tokenized nothing
    first = runs[0]["data"]
    assert first[0][0] == "reading" and first[-1] == ["validation", 200_000, 200_000], first[:3] + first[-3:]
    assert runs[1]["data"] == [], runs[1]["data"][:5]
