"""Prompt-method adapters written by engine.adapters load in the real `peft`
package (test-only reference) and give our logits.

For each of prompt_tuning, p_tuning and prefix_tuning on tiny-llama (causal LM and
classification) and tiny-bert (classification): apply through the engine, perturb
every trainable tensor (so the prompt and head are far from any default), save with
`engine.adapters.save_adapter`, load with `peft.PeftModel.from_pretrained(base, dir)`
and compare. A load that silently did nothing would give the base model's logits,
which the test checks are far away.

Where peft's logits differ from ours by construction, the comparison is on the
part that is comparable:
- causal LM with prompt_tuning / p_tuning: peft returns logits for the virtual
  positions too ([B, N + T, V]); we strip them ([B, T, V]), so we compare peft's
  last T positions.
- Llama classification with prompt_tuning / p_tuning: peft feeds `inputs_embeds`,
  so LlamaForSequenceClassification cannot find the last non-pad token and pools
  the last position. We keep `input_ids` visible to the head and pool the last
  real token. They agree on unpadded batches, which is what we compare (a padded
  batch is checked to differ only in the padded rows).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from engine.adapters import PEFT_CONFIG, save_adapter
from engine.models import load_model

from conftest import require  # noqa: E402

peft = require("peft")   # the test extra: missing, these tests fail (never skip)

from test_adapter_prompt_methods import perturb_trainable, prepared  # noqa: E402

PROMPT_METHODS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 4},
}
COMBOS = [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"), ("tiny-bert", "classification")]
N = 4


def peft_logits(model_name: str, task: str, adapter_dir, input_ids, attention_mask) -> torch.Tensor:
    base = load_model(model_name, task, seed=0).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, str(adapter_dir))
        pm.eval()
        with torch.no_grad():
            return pm(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("model_name,task", COMBOS, ids=[f"{m}-{t}" for m, t in COMBOS])
@pytest.mark.parametrize("method", list(PROMPT_METHODS))
def test_peft_loads_our_prompt_adapter(method, model_name, task, tmp_path):
    prep = prepared(model_name, task, PROMPT_METHODS[method])
    perturb_trainable(prep.model, scale=0.5)
    save_adapter(prep, tmp_path)
    cfg = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert cfg["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING",
                                "prefix_tuning": "PREFIX_TUNING"}[method]
    assert cfg["num_virtual_tokens"] == N

    tok = prep.tokenizer
    enc = tok(["the movie was a delight from start to end"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    prep.model.eval()
    with torch.no_grad():
        ours = prep.model(input_ids=ids, attention_mask=mask).logits
        base = load_model(model_name, task, seed=0).model.eval()(input_ids=ids, attention_mask=mask).logits
    theirs = peft_logits(model_name, task, tmp_path, ids, mask)
    if task == "causal_lm" and method != "prefix_tuning":
        assert theirs.shape[1] == ids.shape[1] + N
        theirs = theirs[:, N:]
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (ours - base).abs().max().item() > 1e-3, "the adapter must change the model"


@pytest.mark.parametrize("method", list(PROMPT_METHODS))
def test_peft_matches_on_padded_batches_where_comparable(method, tmp_path):
    """tiny-bert classification and tiny-llama causal LM with a right-padded batch."""
    for model_name, task in [("tiny-bert", "classification"), ("tiny-llama", "causal_lm")]:
        d = tmp_path / f"{model_name}-{task}"
        prep = prepared(model_name, task, PROMPT_METHODS[method])
        perturb_trainable(prep.model, scale=0.5)
        save_adapter(prep, d)
        enc = prep.tokenizer(["a long sentence about a film", "short"], return_tensors="pt", padding=True)
        prep.model.eval()
        with torch.no_grad():
            ours = prep.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        theirs = peft_logits(model_name, task, d, enc["input_ids"], enc["attention_mask"])
        if task == "causal_lm":
            if method != "prefix_tuning":
                theirs = theirs[:, N:]
            real = enc["attention_mask"].bool()
            torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_prefix_generation_matches_peft():
    """Greedy generation with the prefix in the KV cache: ours and peft's agree."""
    import tempfile
    prep = prepared("tiny-llama", "causal_lm", PROMPT_METHODS["prefix_tuning"])
    perturb_trainable(prep.model, scale=1.0)
    with tempfile.TemporaryDirectory() as d:
        save_adapter(prep, d)
        base = load_model("tiny-llama", "causal_lm", seed=0).model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(base, d).eval()
            enc = prep.tokenizer(["the capital of france is"], return_tensors="pt")
            kw = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=5,
                      do_sample=False, pad_token_id=prep.tokenizer.pad_token_id)
            with torch.no_grad():
                theirs = pm.generate(**kw)
                ours = prep.model.eval().generate(**kw)
    assert torch.equal(ours, theirs)
