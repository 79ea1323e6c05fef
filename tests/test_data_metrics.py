"""Data loading (JSONL, builtin prose, limit/seed, truncation) and the scores (ROUGE, fidelity, needle recall)."""

from __future__ import annotations

import json

import pytest

from kvreviver_core import data, metrics


# -- metrics ---------------------------------------------------------------------------------------------------------
def test_output_equal_to_reference_scores_one():
    text = "The committee approved the new budget for the city's schools on Tuesday."
    assert metrics.rouge_f(text, text) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_unrelated_output_scores_low():
    scores = metrics.rouge_f("The committee approved the new budget for the city's schools on Tuesday.",
                             "Penguins huddle together through the long Antarctic winter darkness.")
    assert max(scores.values()) < 0.1


def test_rouge_matches_a_hand_count():
    # 3 of the reference's 4 unigrams in a 3-word output: P = 1, R = 3/4, F = 6/7. Bigrams: 2 of 3 and 2 of 2.
    scores = metrics.rouge_f("cats chase small mice", "cats chase mice")
    assert scores["rouge1"] == pytest.approx(6 / 7)
    assert scores["rouge2"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert scores["rougeL"] == pytest.approx(6 / 7)


def test_fidelity_compares_text_and_first_token():
    same = metrics.fidelity("a summary of it", [5, 6, 7], "a summary of it", [5, 6, 7])
    assert same == metrics.Fidelity(1.0, True)
    other = metrics.fidelity("something else entirely", [9, 6], "a summary of it", [5, 6, 7])
    assert other.first_token_match is False and other.rouge_l_vs_full == 0.0
    assert metrics.fidelity("", [], "", []).rouge_l_vs_full == 1.0  # both stopped at once: identical


def test_rouge1_recall_finds_the_answer_in_a_sentence():
    assert metrics.rouge1_recall("60494", "The secret passkey mentioned in the text is 60494.") == 1.0
    assert metrics.rouge1_recall("60494", "The passkey is 60495.") == 0.0
    assert metrics.rouge1_recall("blue whale", "It was a whale.") == 0.5
    with pytest.raises(ValueError):
        metrics.rouge1_recall("...", "anything")


# -- JSONL -----------------------------------------------------------------------------------------------------------
def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_with_and_without_references(tmp_path):
    good = _write(tmp_path / "a.jsonl", [{"document": "First doc.", "summary": "One."}, "",
                                         {"document": "Second doc.", "summary": "Two.", "id": "x"}])
    examples = data.read_jsonl(good, "document", "summary")
    assert [(e.id, e.document, e.reference) for e in examples] == [("line-1", "First doc.", "One."),
                                                                    ("x", "Second doc.", "Two.")]
    bare = _write(tmp_path / "b.jsonl", [{"text": "Only text."}])
    assert data.read_jsonl(bare, "text", "summary")[0].reference is None


@pytest.mark.parametrize("lines, expected", [
    ([{"document": "a", "summary": "b"}, "{not json", {"document": "c", "summary": "d"}], ":2: not valid JSON"),
    ([[1, 2]], ":1: expected a JSON object, got list"),
    ([{"document": "a", "summary": "b"}, {"body": "c", "summary": "d"}], ":2: no field 'document'"),
    ([{"document": 3, "summary": "b"}], ":1: field 'document' must be a string"),
    ([{"document": "  ", "summary": "b"}], ":1: field 'document' is empty"),
    ([{"document": "a", "summary": "b"}, {"document": "c"}], ":2: lacks the reference field 'summary'"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, expected):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as info:
        data.read_jsonl(path, "document", "summary")
    assert f"{path}{expected}" in str(info.value)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.read_jsonl(tmp_path / "nope.jsonl", "document", "summary")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        data.read_jsonl(tmp_path / "empty.jsonl", "document", "summary")


def test_limit_takes_a_prefix_of_the_seeded_shuffle(tmp_path):
    path = _write(tmp_path / "many.jsonl", [{"document": f"doc {i}", "summary": f"s {i}"} for i in range(30)])
    ids = lambda limit, seed: [e.id for e in data.load_examples(str(path), None, 512, limit, seed).examples]  # noqa: E731
    assert ids(3, 0) == ids(5, 0)[:3]
    assert sorted(ids(None, 0)) == sorted(f"line-{i}" for i in range(1, 31))
    assert ids(5, 0) != ids(5, 1)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_examples("no-such-set", None, 512)


# -- prompts: truncation keeps the instruction, builtin prose is the held-out part --------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from test_eval import save_tiny_model

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_truncation_caps_the_prompt_and_keeps_the_instruction(tokenizer):
    long_doc = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(200))
    dataset = data.SummarizationSet("t", [data.Example("long", long_doc, "r"), data.Example("short", "Tiny doc.", "r")],
                                    "Summarize the above article in 1 sentence.", "Article")
    long_prompt, short_prompt = data.build_prompts(dataset, tokenizer, max_context=120)
    assert long_prompt.truncated and long_prompt.prompt_tokens <= 120
    assert long_prompt.prompt_tokens >= 110  # the room is used, not thrown away
    assert "Summarize the above article in 1 sentence." in long_prompt.text
    body = long_prompt.text.split("Article: ", 1)[1].split("\n\nSummarize", 1)[0]
    assert long_doc.startswith(body) and len(body) < len(long_doc)
    assert not short_prompt.truncated and "Article: Tiny doc.\n\nSummarize" in short_prompt.text
    with pytest.raises(ValueError, match="leaves .* tokens for the document"):
        data.build_prompts(dataset, tokenizer, max_context=10)


def test_builtin_passages_come_from_the_held_out_prose_and_fit(tokenizer):
    from kvreviver_core.calibration import builtin_prose

    held_out, calibration = builtin_prose("heldout"), builtin_prose("calibration")
    room = data.document_token_room(tokenizer, data.BUILTIN_INSTRUCTION, "Text", 300)
    passages = data.builtin_passages(tokenizer, room)
    assert len(passages) >= 5
    for passage in passages:
        assert passage.reference is None
        for paragraph in passage.document.split("\n\n"):  # real held-out prose, never seen by calibration
            assert paragraph in held_out and paragraph not in calibration
    prompts = data.build_prompts(data.load_examples("builtin", tokenizer, 300, limit=4), tokenizer, 300)
    assert len(prompts) == 4 and all(p.prompt_tokens <= 300 for p in prompts)
