"""engine.serving and engine.serve_batcher on a tiny random Llama: a batch of rows
decodes what each row decodes alone (and what transformers' own generate does), echo
scores are the model's log-probabilities of the prompt, stop strings cut the text and
never stream, a seed repeats its draw, and concurrent submits run as fewer batches
and fewer forwards than one by one (counted)."""

from __future__ import annotations

import pytest
import torch

from engine import serving
from engine.models import load_model
from engine.serve_batcher import Batcher
from engine.serving import Row, Sampling, run_rows


@pytest.fixture(scope="module")
def lm():
    loaded = load_model("tiny-llama", "causal_lm", seed=0)
    return loaded.model.eval(), loaded.tokenizer


PROMPTS = ["Name a colour of the sky.", "hello", "What is two plus two? Answer in one word please."]


def ids_of(tok, text):
    return serving.text_prompt_ids(tok, text)


def greedy(n=6, **kw):
    return Sampling(max_tokens=n, temperature=0.0, **kw)


def test_text_prompt_has_no_trailing_eos(lm):
    model, tok = lm
    ids = ids_of(tok, "hello world")
    assert ids[0] == tok.cls_token_id and ids[-1] not in serving.stop_token_ids(model, tok)


def test_a_batch_decodes_what_each_row_decodes_alone_and_what_generate_does(lm):
    model, tok = lm
    rows = [Row(ids_of(tok, p), greedy(6 + i)) for i, p in enumerate(PROMPTS)]
    together = run_rows(model, tok, rows)
    for r, res in zip(rows, together):
        alone = run_rows(model, tok, [Row(r.prompt, r.sampling)])[0]
        assert [t.id for t in res.tokens] == [t.id for t in alone.tokens]
        # the log-probabilities too: a random model's argmax barely moves, its distribution does
        assert [t.logprob for t in res.tokens] == pytest.approx([t.logprob for t in alone.tokens], abs=1e-5)
        assert res.text == alone.text
        x = torch.tensor([r.prompt])
        with torch.no_grad():
            ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=r.sampling.max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(serving.stop_token_ids(model, tok)))
        assert [t.id for t in res.tokens] == ref[0, len(r.prompt):].tolist()
        assert res.finish_reason in ("length", "stop") and len(res.tokens) <= r.sampling.max_tokens


def test_echo_scores_are_the_models_log_probabilities_of_the_prompt(lm):
    model, tok = lm
    rows = [Row(ids_of(tok, p), Sampling(max_tokens=1, temperature=0.0, top_logprobs=2, echo_scores=True))
            for p in PROMPTS]
    results = run_rows(model, tok, rows)
    for r, res in zip(rows, results):
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([r.prompt])).logits[0].float().log_softmax(-1)
        want = [float(logp[j, r.prompt[j + 1]]) for j in range(len(r.prompt) - 1)]
        got = res.prompt_scores
        assert len(got) == len(r.prompt) and got[0].logprob is None and got[0].id == r.prompt[0]
        assert [t.id for t in got] == r.prompt
        assert [t.logprob for t in got[1:]] == pytest.approx(want, abs=2e-5)
        best = [float(logp[j].max()) for j in range(len(r.prompt) - 1)]
        assert [t.top[0][2] for t in got[1:]] == pytest.approx(best, abs=2e-5)
        # the one generated token is the argmax after the whole prompt, scored the same way
        assert res.tokens[0].id == int(logp[-1].argmax())
        assert res.tokens[0].logprob == pytest.approx(float(logp[-1].max()), abs=2e-5)


def test_max_tokens_zero_scores_without_generating(lm):
    model, tok = lm
    res = run_rows(model, tok, [Row(ids_of(tok, "hello there"), Sampling(max_tokens=0, echo_scores=True))])[0]
    assert res.tokens == [] and res.text == "" and len(res.prompt_scores) == len(ids_of(tok, "hello there"))


def test_stop_string_cuts_the_text_and_is_never_streamed(lm):
    model, tok = lm
    prompt = ids_of(tok, PROMPTS[0])

    def drawn(**kw):      # a seeded draw: varied words (greedy repeats one token on a random model)
        return Sampling(max_tokens=12, temperature=1.0, seed=3, **kw)
    full = run_rows(model, tok, [Row(prompt, drawn())])[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2][:3]
    cut = full[:full.find(stop)]
    pieces = []
    res = run_rows(model, tok, [Row(prompt, drawn(stop=(stop,)), on_text=pieces.append)])[0]
    assert res.text == cut and res.finish_reason == "stop"
    assert "".join(pieces) == cut
    assert all(stop not in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_held_back_keeps_a_possible_stop_start():
    assert serving.held_back("abc ST", ("STOP",)) == 2
    assert serving.held_back("abc", ("STOP",)) == 0
    assert serving.held_back("ab\ufffd", ()) == 1


def test_a_seed_repeats_its_draw_and_another_seed_draws_otherwise(lm):
    model, tok = lm
    prompt = ids_of(tok, "hello")

    def draw(seed, others=0):
        rows = [Row(prompt, Sampling(max_tokens=8, temperature=1.0, seed=seed))]
        rows += [Row(ids_of(tok, "x" * (k + 1)), Sampling(max_tokens=3, temperature=1.0)) for k in range(others)]
        return [t.id for t in run_rows(model, tok, rows)[0].tokens]
    a = draw(7)
    assert draw(7) == a
    assert draw(7, others=2) == a          # batched with other rows: the same draw
    assert draw(8) != a


def test_concurrent_submits_run_as_fewer_batches_and_forwards(lm):
    model, tok = lm
    n, steps = 5, 4
    batcher = Batcher(window_s=0.3)
    prompts = [ids_of(tok, p) for p in PROMPTS + ["one more", "and the last"]][:n]
    alone = [run_rows(model, tok, [Row(p, greedy(steps))])[0].text for p in prompts]

    def compute(rows):
        return run_rows(model, tok, rows)
    before = serving.FORWARDS.value
    futures = [batcher.submit("tiny", compute, [Row(p, greedy(steps))]) for p in prompts]
    texts = [f.result(timeout=120)[0].text for f in futures]
    forwards = serving.FORWARDS.value - before
    assert texts == alone
    assert batcher.requests == n and batcher.batches < n
    assert forwards < n * steps            # one by one: at least `steps` forwards each


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on():
    batcher = Batcher(window_s=0.0)

    def boom(rows):
        raise RuntimeError("no")
    with pytest.raises(RuntimeError):
        batcher.run("k", boom, [1])
    assert batcher.run("k", lambda rows: [r * 2 for r in rows], [1, 2]) == [2, 4]
