"""model/evaluate.py: the scores' definitions, k-shot prompts, target masks, and that the
batching never changes a loss (sums and counts are added, never means)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pathways_lite.model import evaluate as ev
from pathways_lite.model.tasks import TextPair

pytestmark = pytest.mark.timeout(300)


def test_exact_match_and_token_f1_compare_lower_cased_whitespace_tokens() -> None:
    assert ev.exact_match("Return  the Value", "return the value") == 1.0
    assert ev.exact_match("return value", "return the value") == 0.0
    # 2 common tokens: precision 2/2, recall 2/3.
    assert math.isclose(ev.token_f1("return value", "return the value"), 0.8)
    assert ev.token_f1("x", "y") == 0.0 and ev.token_f1("", "") == 1.0


def test_k_shot_prompts_put_shots_before_the_input_and_drop_the_oldest_to_fit(tokenizer):
    sep, eos = tokenizer.sep_id, tokenizer.eos_id
    assert sep >= 0
    shots = [TextPair("add two numbers", "add"), TextPair("open a file", "open")]
    ids = ev.prompt_ids(tokenizer, shots, "close it", max_len=1000)
    expected = []
    for s in shots:
        expected += [*tokenizer.encode(s.inputs), sep, *tokenizer.encode(s.targets), eos]
    assert ids == [*expected, *tokenizer.encode("close it"), sep]
    short = ev.prompt_ids(tokenizer, shots, "close it", max_len=len(ids) - 1)
    assert short == ids[len(tokenizer.encode("add two numbers")) + 3 :]  # the first shot went


def test_pair_rows_weigh_only_the_positions_that_predict_targets(tokenizer):
    pair = TextPair("the docstring of a function", "name")
    rows, weights = ev.pair_rows(tokenizer, [pair], seq_len=32)
    head = [*tokenizer.encode(pair.inputs), tokenizer.sep_id]
    target = [*tokenizer.encode(pair.targets), tokenizer.eos_id]
    assert rows[0, : len(head) + len(target)].tolist() == head + target
    predicted = rows[0, 1:][weights[0] == 1].tolist()  # what the weighted positions predict
    assert predicted == target


def test_a_loss_is_the_same_whatever_the_batching(tokenizer) -> None:
    import jax

    from pathways_lite.model.config import PalmConfig
    from pathways_lite.model.optim import OptimConfig
    from pathways_lite.model.train import StepFunctions

    cfg = PalmConfig.palm_tiny(vocab_size=tokenizer.vocab_size)
    fns = StepFunctions(cfg, OptimConfig())
    params = fns.init(0).params
    pairs = [TextPair(f"docstring number {i} of a function", f"name_{i}") for i in range(5)]
    rows, weights = ev.pair_rows(tokenizer, pairs, seq_len=32)

    def place(a):
        return jax.device_put(a, fns.batch_sharding)

    losses = [
        ev.mean_loss(ev.loss_sums_fn(fns), params, rows, weights, b, place, fns.mesh)
        for b in (1, 2, 8)
    ]
    assert max(losses) - min(losses) < 1e-5, losses
    # The mean of the per-row sums over the targets' token count.
    per_row = [
        ev.mean_loss(
            ev.loss_sums_fn(fns), params, rows[i : i + 1], weights[i : i + 1], 1, place, fns.mesh
        )
        * weights[i].sum()
        for i in range(len(rows))
    ]
    assert math.isclose(sum(per_row) / weights.sum(), losses[0], rel_tol=1e-5)
    score = ev.evaluate_text2text(
        fns,
        params,
        tokenizer,
        "t",
        pairs,
        pairs[:2],
        shots=1,
        seq_len=32,
        batch_rows=2,
        place=place,
        max_new_tokens=4,
    )
    assert score.examples == 5 and math.isclose(score.loss, losses[0], rel_tol=1e-5)
    assert 0.0 <= score.exact_match <= score.token_f1 <= 1.0  # EM = 1 implies F1 = 1
    assert np.isfinite(score.perplexity)
