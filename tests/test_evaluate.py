"""Evaluation helpers on hand-made inputs: assessment accuracy (ties count half) and majority voting."""

import pytest

from aft.evaluate import assessment_accuracy, majority


def test_assessment_accuracy_by_hand():
    groups = [{"prompt": "a", "completions": ["p", "n1", "n2"], "labels": [1, 0, 0]},
              {"prompt": "b", "completions": ["p", "n"], "labels": [1, 0]}]
    scores = [[-1.0, -2.0, -1.0], [-3.0, -1.0]]
    # group a: p > n1 ordered (1), p == n2 tie (0.5); group b: p < n wrong (0) -> (1 + 0.5 + 0) / 3 pairs = 0.5
    result = assessment_accuracy(groups, scores)
    assert result["pairs"] == 3
    assert result["assessment_accuracy"] == pytest.approx(0.5)
    # positives -1, -3 -> -2; negatives -2, -1, -1 -> -4/3
    assert result["score_positive"] == pytest.approx(-2.0)
    assert result["score_negative"] == pytest.approx(-4 / 3)


def test_assessment_accuracy_ignores_unscored_candidates():
    groups = [{"prompt": "a", "completions": ["p", "n"], "labels": [1, 0]}]
    assert assessment_accuracy(groups, [[None, -1.0]])["pairs"] == 0


def test_majority_vote():
    assert majority(["3", "4", "4", None]) == "4"
    assert majority(["5", "6"]) == "5"  # tie: first seen wins
    assert majority([None, None]) is None


def test_held_out_evaluation_while_training_caps_its_batches_only_on_an_accelerator():
    from aft.generation import plan_batches
    from aft.train import held_out_batch_size
    from aft.tiny import build_tokenizer

    assert held_out_batch_size(8, "cuda:0") == 32  # shares the GPU with the training state
    assert held_out_batch_size(8, "cpu") == 0
    # on a CPU 200 questions go in one generation batch (sized by KV-cache tokens), not in 7 of 32
    tokenizer = build_tokenizer(["What is one and two? 1 + 2 = 3"] * 4)
    prompts = [f"Question {i}: what is {i} + 1?" for i in range(200)]
    assert len(plan_batches(tokenizer, prompts, held_out_batch_size(8, "cpu"), 1, 96, 65536)) == 1
    assert len(plan_batches(tokenizer, prompts, held_out_batch_size(8, "cuda"), 1, 96, 65536)) == 7
