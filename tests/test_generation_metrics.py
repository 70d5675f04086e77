"""Generation metrics of causal-LM runs (engine.generation, issue #18): scores against
hand-computed values and sacrebleu / rouge-score called directly; batched left-padded
decoding equal to each prompt alone and to transformers' own greedy `generate`, for
LoRA and prompt/prefix methods; bleu / rouge_l / exact_match / gen_rows / samples at
every evaluation of real tiny-llama runs (one process, multi-task, FSDP on two CPU
ranks, through a worker and GET /api/runs/{id}/metrics); `metric` choosing the best
metric; the training RNG untouched; SmolLM2 stopping at its EOS (slow)."""

import json
import math
from typing import Optional

import pytest
import torch

from conftest import require
from engine.config import ConfigError, parse_run_config
from engine.generation import (MAX_SAMPLES, clean_text, generation_set, greedy_decode, score_generations,
                               stop_token_ids)
from engine.prepare import prepare_run
from engine.tokens import format_prompt_ids
from engine.train import primary_metric, train

GEN_KEYS = {"bleu", "rouge_l", "exact_match", "gen_rows", "samples"}
LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def config(method=None, dataset=None, metric=None, **training) -> dict:
    d = {"name": "gen", "model": "tiny-llama", "task": "causal_lm",
         "dataset": dataset or {"name": "demo-instruct", "max_rows": 120},
         "method": method or LORA,
         "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 32, "eval_every": 2,
                      "eval_batches": 1, "eval_generate": 6, "eval_generate_tokens": 5, **training}}
    if metric:
        d["metric"] = metric
    return d


def validation_pairs(prep) -> set[tuple[str, str]]:
    v = prep.examples.validation
    return set(zip(v["prompt"], v["response"]))


def gen_evals(history) -> list[dict]:
    return [h["eval"] for h in history if h["eval"]]


def assert_scores_are_of_the_samples(ev: dict, prefix: str = "") -> None:
    """The evaluation's BLEU / ROUGE-L / exact match / row count are the scores of its own
    stored (output, reference) pairs (every scored row is kept as a sample here)."""
    samples = ev[f"{prefix}samples"]
    assert len(samples) == ev[f"{prefix}gen_rows"], "every scored row must be a sample to rescore them"
    again = score_generations([s["output"] for s in samples], [s["reference"] for s in samples])
    assert {k: ev[f"{prefix}{k}"] for k in again} == pytest.approx(again)


# ------------------------------------------------------------------ scoring

def test_scores_of_identical_disjoint_and_partial_outputs():
    sacrebleu = require("sacrebleu")
    rouge_scorer = require("rouge_score.rouge_scorer")
    refs = ["The capital of France is Paris.", "Twelve plus seven is nineteen today."]
    same = score_generations(refs, refs)
    assert same["bleu"] == pytest.approx(100.0) and same["rouge_l"] == pytest.approx(1.0)
    assert same["exact_match"] == 1.0 and same["gen_rows"] == 2
    apart = score_generations(["alpha beta gamma delta", "one two three four five"], refs)
    assert apart == {"bleu": 0.0, "rouge_l": 0.0, "exact_match": 0.0, "gen_rows": 2}

    outs = ["  The capital of France is Paris. \n", "Twelve and seven make nineteen."]
    got = score_generations(outs, refs)
    assert got["exact_match"] == 0.5                       # the first matches once trimmed
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = sum(scorer.score(r, o)["rougeL"].fmeasure for o, r in zip(outs, refs)) / 2
    assert got["rouge_l"] == pytest.approx(want) and 0.0 < got["rouge_l"] < 1.0 and 0.0 < got["bleu"] < 100.0
    # by hand: "twelve seven nineteen" is the LCS of 5 and 6 tokens -> F = 2*(3/5)*(3/6)/(3/5+3/6)
    assert scorer.score(refs[1], outs[1])["rougeL"].fmeasure == pytest.approx(2 * 0.6 * 0.5 / 1.1)

    with pytest.raises(ValueError, match="2 outputs but 1 references"):
        score_generations(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no outputs"):
        score_generations([], [])
    assert clean_text("a\x00b\ud800c\td\ne") == "a\ufffdb\ufffdc\td\ne"
    assert len(clean_text("x" * 5000)) == 1000


# ------------------------------------------------------------------ decoding

def perturbed(method: dict, cfg: Optional[dict] = None):
    """A prepared tiny-llama run whose trainable tensors are moved off their (often
    identity) start, so the method really changes what is decoded (the tiny random
    base alone decodes only [SEP])."""
    prep = prepare_run(parse_run_config(cfg or config(method)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in prep.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 2.0)
    return prep


@pytest.mark.parametrize("method", [LORA, {"name": "prefix_tuning", "num_virtual_tokens": 4},
                                    {"name": "llama_adapter", "adapter_len": 3}], ids=lambda m: m["name"])
def test_batched_left_padded_decode_matches_hf_generate_on_each_prompt_alone(method):
    prep = perturbed(method)
    model, tok = prep.model, prep.tokenizer
    prompts = generation_set(prep.examples.validation, 3, seed=0).prompts + [
        "Opposite of cold?", "Name the capital city of the country called Japan, please, in one short sentence."]
    assert len({len(format_prompt_ids(tok, p)) for p in prompts}) >= 3     # rows of different lengths: padded
    model.train()
    seen: dict[int, list[int]] = {}
    batched = greedy_decode(model, tok, prompts, 6, 3, "cpu", on_token=lambda i, t: seen.setdefault(i, []).append(t),
                            stop_ids=set())
    assert model.training                                      # the caller's mode is restored
    model.eval()                  # the reference: transformers' greedy generate on each prompt alone, unpadded
    for i, p in enumerate(prompts):
        ids = torch.tensor([format_prompt_ids(tok, p)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert out[0, ids.shape[1]:].tolist() == seen[i]               # the very tokens, in order
        assert tok.decode(seen[i], skip_special_tokens=True).strip() == batched[i]
    assert len({t for ts in seen.values() for t in ts}) > 1    # varied tokens: the comparison says something


def test_decoding_stops_each_row_at_its_eos():
    prep = perturbed(LORA)
    model, tok = prep.model, prep.tokenizer
    gs = generation_set(prep.examples.validation, 4, seed=0)
    ids: dict[int, list[int]] = {}
    greedy_decode(model, tok, gs.prompts, 6, 4, "cpu", on_token=lambda i, t: ids.setdefault(i, []).append(t),
                  stop_ids=set())
    assert all(len(ids[i]) == 6 for i in range(4))            # no stop token: every row runs to the cap
    stop = ids[0][2]                                           # row 0's third token becomes the stop token
    counts: dict[int, int] = {}
    cut = greedy_decode(model, tok, gs.prompts, 6, 4, "cpu", stop_ids={stop},
                        on_token=lambda i, t: counts.__setitem__(i, counts.get(i, 0) + 1))
    for i in range(4):                # each row ends at its own first stop token; the others go on unchanged
        k = ids[i].index(stop) if stop in ids[i] else 6
        assert counts.get(i, 0) == k and cut[i] == tok.decode(ids[i][:k], skip_special_tokens=True).strip()
    assert counts.get(0, 0) <= 2


# ------------------------------------------------------------------ runs in one process

@pytest.fixture(scope="module")
def runs():
    """The same LoRA run (with dropout: training draws from the RNG every step) with
    generation on and off."""
    method = {**LORA, "dropout": 0.2}
    with_gen = prepare_run(parse_run_config(config(method)))
    res = train(with_gen)
    without = train(prepare_run(parse_run_config(config(method, eval_generate=0))))
    return with_gen, res, without


def test_every_evaluation_has_generation_metrics_and_samples_from_the_validation_data(runs):
    prep, res, _ = runs
    evals = gen_evals(res.history)
    assert [h["step"] for h in res.history if h["eval"]] == [2, 4]
    pairs = validation_pairs(prep)
    prompts = None
    for ev in evals:
        assert GEN_KEYS <= set(ev)
        assert ev["gen_rows"] == 6 and len(ev["samples"]) == 6 <= MAX_SAMPLES
        assert_scores_are_of_the_samples(ev)
        for s in ev["samples"]:
            assert set(s) == {"prompt", "reference", "output"} and isinstance(s["output"], str)
            assert (s["prompt"], s["reference"]) in pairs
        prompts = prompts or [s["prompt"] for s in ev["samples"]]
        assert [s["prompt"] for s in ev["samples"]] == prompts     # the same prompts at every evaluation
    assert res.eval == evals[-1] and res.metric_name == "eval_loss"
    assert res.best_metric == min(ev["eval_loss"] for ev in evals)
    json.dumps(res.history)                                        # what metrics.jsonl and the worker store


def test_generation_off_gives_no_generation_keys_and_the_same_training_losses(runs):
    _, res, without = runs
    for ev in gen_evals(without.history):
        assert not GEN_KEYS & set(ev) and "eval_loss" in ev
    assert [h["loss"] for h in res.history] == [h["loss"] for h in without.history]
    assert [ev["eval_loss"] for ev in gen_evals(res.history)] == [ev["eval_loss"] for ev in gen_evals(without.history)]


def write_pairs(path, prompts: list[str], responses: list[str]) -> dict:
    path.write_text("".join(json.dumps({"q": p, "a": r}) + "\n" for p, r in zip(prompts, responses)))
    return {"path": str(path), "prompt_column": "q", "response_column": "a"}


def test_a_runs_scores_are_of_each_output_against_its_own_reference(tmp_path):
    """Every other reference is what the model decodes for its prompt, so the scores are
    well above zero and differ row by row: scored against another row's reference, or the
    prompts, a run would report other numbers than its stored samples give."""
    prompts = [f"Tell me something about item number {i}." for i in range(100)]
    path = tmp_path / "echo.jsonl"
    cfg = config(dataset=write_pairs(path, prompts, ["placeholder"] * 100), max_steps=1, learning_rate=1e-9,
                 eval_generate=MAX_SAMPLES, eval_generate_tokens=4)
    prep = perturbed(LORA, cfg)                      # the run's model as it will be trained (a learning rate of ~0)
    decoded = greedy_decode(prep.model, prep.tokenizer, prompts, 4, 16, "cpu", max_prompt_len=32)
    assert sum(bool(d) for d in decoded) > 90 and len(set(decoded)) > 50, decoded[:10]
    refs = [d if i % 2 == 0 and d else f"another answer for row {i}" for i, d in enumerate(decoded)]
    res = train(perturbed(LORA, {**cfg, "dataset": write_pairs(path, prompts, refs)}))
    ev = res.eval
    assert ev["gen_rows"] == MAX_SAMPLES
    assert_scores_are_of_the_samples(ev)
    assert 0 < ev["exact_match"] < 1 and ev["bleu"] > 0, ev
    outs, got = [s["output"] for s in ev["samples"]], [s["reference"] for s in ev["samples"]]
    assert all(s["reference"] == refs[prompts.index(s["prompt"])] for s in ev["samples"])
    rotated = score_generations(outs, got[1:] + got[:1])         # the check has power: wrong pairs score otherwise
    assert {k: ev[k] for k in ("bleu", "rouge_l", "exact_match")} != pytest.approx(
        {k: rotated[k] for k in ("bleu", "rouge_l", "exact_match")})


def test_metric_rouge_l_makes_the_best_metric_the_highest_rouge_l(tmp_path):
    path = tmp_path / "yes.jsonl"        # one answer to learn: ROUGE-L climbs from 0 within a few steps
    path.write_text("".join(json.dumps({"q": f"question number {i}", "a": "yes"}) + "\n" for i in range(60)))
    cfg = config({"name": "full"}, {"path": str(path), "prompt_column": "q", "response_column": "a"}, "rouge_l",
                 max_steps=8, learning_rate=3e-2, max_seq_len=24, eval_generate=4, eval_generate_tokens=3)
    res = train(prepare_run(parse_run_config(cfg)))
    rouge = [ev["rouge_l"] for ev in gen_evals(res.history)]
    assert len(rouge) == 4 and max(rouge) > min(rouge), rouge
    for ev in gen_evals(res.history):      # scores above zero: scored against anything but "yes", they would differ
        assert_scores_are_of_the_samples(ev)
    assert res.metric_name == "rouge_l" and res.best_metric == max(rouge)
    assert primary_metric("causal_lm", "rouge_l") == ("rouge_l", True)
    assert primary_metric("causal_lm") == ("eval_loss", False) and primary_metric("classification")[0] == "accuracy"


def test_generation_metric_needs_generation_and_references(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"metric: 'bleu' needs training.eval_generate > 0"):
        parse_run_config(config(metric="bleu", eval_generate=0))
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": f"story number {i} ends well"}) + "\n" for i in range(40)))
    text_only = {"path": str(path), "text_column": "text"}
    with pytest.raises(ValueError, match=r"metric: 'bleu' needs validation rows with a prompt and a response"):
        train(prepare_run(parse_run_config(config(dataset=text_only, metric="bleu"))))
    caplog.set_level("WARNING", logger="engine.generation")
    caplog.clear()
    res = train(prepare_run(parse_run_config(config(dataset=text_only, max_steps=2))))
    assert res.eval and not GEN_KEYS & set(res.eval)
    why = [r.getMessage() for r in caplog.records if "no generation metrics" in r.getMessage()]
    assert len(why) == 1 and "only a text column" in why[0]           # said once, not at every evaluation


def test_a_prefix_tuning_run_decodes_at_its_evaluations():
    res = train(prepare_run(parse_run_config(config({"name": "prefix_tuning", "num_virtual_tokens": 4}, max_steps=2))))
    assert GEN_KEYS <= set(res.eval) and res.eval["gen_rows"] == 6


def test_multi_task_runs_report_generation_metrics_per_task(tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": f"story number {i} ends well"}) + "\n" for i in range(40)))
    cfg = config(dataset={"tasks": [{"name": "instruct", "bundled": "demo-instruct", "max_rows": 60},
                                    {"name": "pairs", "bundled": "demo-instruct", "max_rows": 40},
                                    {"name": "stories", "path": str(path)}]}, max_steps=2, eval_generate=3)
    ev = train(prepare_run(parse_run_config(cfg))).eval
    for task in ("instruct", "pairs"):
        assert {f"eval/{task}/{k}" for k in GEN_KEYS} <= set(ev)
        assert ev[f"eval/{task}/gen_rows"] == 3 and len(ev[f"eval/{task}/samples"]) == 3
        assert_scores_are_of_the_samples(ev, f"eval/{task}/")
    assert not [k for k in ev if k.startswith("eval/stories/") and k.split("/")[-1] in GEN_KEYS]
    assert ev["bleu"] == pytest.approx((ev["eval/instruct/bleu"] + ev["eval/pairs/bleu"]) / 2)
    assert ev["gen_rows"] == 6 and "samples" not in ev              # samples only per task


# ------------------------------------------------------------------ a worker, the API, two ranks

def test_a_worker_run_serves_generation_metrics_through_the_api(settings):
    from fastapi.testclient import TestClient

    from studio import service
    from studio.api import build_api
    from workers.tasks import execute_run

    rid = service.submit_run(settings, config(metric="exact_match", max_steps=2))
    assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
    c = TestClient(build_api(settings))                        # the /api app, as the studio mounts it
    rows = c.get(f"/runs/{rid}/metrics")
    assert rows.status_code == 200
    evals = [m["eval"] for m in rows.json() if m["eval"]]
    assert len(evals) == 1 and GEN_KEYS <= set(evals[0]) and evals[0]["gen_rows"] == 6
    assert {"prompt", "reference", "output"} == set(evals[0]["samples"][0])
    assert_scores_are_of_the_samples(evals[0])
    run = c.get(f"/runs/{rid}").json()
    assert run["metric_name"] == "exact_match" and run["best_metric"] == evals[0]["exact_match"]


def test_fsdp_on_two_cpu_ranks_reports_generation_metrics(tmp_path):
    from engine.launch import launch_local

    cfg = config(max_steps=2, batch_size=2, eval_generate=4, eval_generate_tokens=4,
                 distributed={"world_size": 2, "strategy": "fsdp"})
    res = launch_local(cfg, tmp_path / "out")
    assert res.world_size == 2 and res.steps == 2
    assert GEN_KEYS <= set(res.eval) and res.eval["gen_rows"] == 4 and len(res.eval["samples"]) == 4
    assert_scores_are_of_the_samples(res.eval)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert GEN_KEYS <= set(rows[-1]["eval"])
    assert_scores_are_of_the_samples(rows[-1]["eval"])


# ------------------------------------------------------------------ the bundled SmolLM2

@pytest.mark.slow
def test_smollm2_decodes_until_its_eos_and_scores_are_finite():
    cfg = {"name": "smol", "model": "smollm2-135m", "task": "causal_lm",
           "dataset": {"name": "demo-instruct", "max_rows": 40},
           "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
           "training": {"max_steps": 1, "batch_size": 4, "max_seq_len": 48, "eval_every": 0, "eval_batches": 1,
                        "eval_generate": 4, "eval_generate_tokens": 32}}
    prep = prepare_run(parse_run_config(cfg))
    tok = prep.tokenizer
    assert tok.eos_token_id in stop_token_ids(prep.model, tok)
    counts: dict[int, int] = {}
    out = greedy_decode(prep.model, tok, ["What is the capital of France?"], 40, 1, "cpu",
                        on_token=lambda i, t: counts.__setitem__(i, counts.get(i, 0) + 1))
    assert "Paris" in out[0] and counts[0] < 40                   # stopped at <|im_end|>, well before the cap
    res = train(prep)
    assert GEN_KEYS <= set(res.eval) and res.eval["gen_rows"] == 4
    assert all(math.isfinite(res.eval[k]) for k in ("bleu", "rouge_l", "exact_match"))
