"""Group records in: malformed lines and missing fields name file:line; TRL and RRHF formats convert."""

import json

import pytest

from aft.data import DataError, load_groups


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "g.jsonl", [json.dumps({"prompt": "q", "completions": ["a"], "labels": [1]}), "{oops"])
    with pytest.raises(DataError, match=r"g\.jsonl:2: not valid JSON"):
        load_groups(path)


def test_missing_field_names_field_and_line(tmp_path):
    path = write(tmp_path / "g.jsonl", [json.dumps({"prompt": "q", "completions": ["a"]})])
    with pytest.raises(DataError, match=r"g\.jsonl:1: missing field\(s\) labels"):
        load_groups(path)


def test_trl_pairs_with_same_prompt_merge_into_one_group(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "q1", "chosen": "good", "rejected": "bad"}),
        json.dumps({"prompt": "q1", "chosen": "good", "rejected": "worse"}),
        json.dumps({"prompt": "q2", "chosen": "yes", "rejected": "no"}),
    ])
    groups, report = load_groups(path)
    assert [g["prompt"] for g in groups] == ["q1", "q2"]
    assert groups[0]["completions"] == ["good", "bad", "worse"]
    assert groups[0]["labels"] == [1.0, 0.0, 0.0]
    assert report["pairs"] == 3 and report["groups"] == 2


def test_rrhf_format_loads_scores_as_labels(tmp_path):
    path = write(tmp_path / "r.jsonl", [json.dumps({"query": "q", "responses": ["a", "b"], "scores": [0.5, -1]})])
    groups, _ = load_groups(path)
    assert groups == [{"id": "line-1", "prompt": "q", "completions": ["a", "b"], "labels": [0.5, -1]}]


def test_group_with_only_positives_is_kept_and_counted(tmp_path):
    path = write(tmp_path / "g.jsonl", [json.dumps({"prompt": "q", "completions": ["a", "b"], "labels": [1, 1]})])
    groups, report = load_groups(path)
    assert len(groups) == 1
    assert report["groups without a pair (NLL only)"] == 1


def test_tokenize_group_skips_and_counts_empty_and_too_long(tokenizer):
    from collections import Counter

    from aft.data import encode_prompt, tokenize_group

    prompt = "Tom has 3 apples."
    room = len(encode_prompt(tokenizer, prompt)) + 12
    group = {"prompt": prompt, "completions": ["3 + 4 = 7", "   ", "3 + 4 = 7 " * 20], "labels": [1, 0, 0]}
    report = Counter()
    feature = tokenize_group(tokenizer, group, max_length=room, report=report)
    assert len(feature["completion_ids"]) == 1 and feature["labels"] == [1.0]
    assert report["skipped: empty completion"] == 1
    assert report["skipped: longer than max_length"] == 1


@pytest.mark.parametrize("nll_on, candidates, reference", [
    ("reference", [0, 0, 0, 0], True), ("positives", [1, 0, 1, 1], False), ("both", [1, 0, 1, 1], True),
    ("best", [0, 0, 1, 0], False), ("none", [0, 0, 0, 0], False)])
def test_group_collator_nll_weights(tokenizer, nll_on, candidates, reference):
    # One hand-built group: ranking labels 1, 0, 3, 3 and "correct" 1, 0, 1, 1 (the positives); the best is the
    # first positive of the highest label (candidate 2). A second group has no positive: "best" picks nothing.
    from collections import Counter

    from aft.data import GroupCollator, tokenize_group

    group = {"prompt": "Question: 1 + 1?\nAnswer:", "completions": [" 2\n#### 2", " 3\n#### 3", " 1 + 1 = 2\n#### 2",
                                                                    " so 2\n#### 2"],
             "labels": [1.0, 0.0, 3.0, 3.0], "correct": [True, False, True, True], "reference": " 1 + 1 = 2\n#### 2"}
    wrong = {**group, "labels": [0.0, 0.0, 0.0, 0.0], "correct": [False] * 4}
    features = [tokenize_group(tokenizer, g, 64, Counter(), nll_on) for g in (group, wrong)]
    batch = GroupCollator(tokenizer.pad_token_id, nll_on)(features)
    first = batch["group_index"] == 0
    is_ref = batch["candidate_index"] == -1
    assert batch["nll_weight"][first & ~is_ref].tolist() == candidates
    assert batch["nll_weight"][first & is_ref].tolist() == ([1.0] if reference else [])
    second = (batch["group_index"] == 1) & ~is_ref
    assert batch["nll_weight"][second].tolist() == [0.0] * 4
