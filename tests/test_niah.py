"""`kvreviver niah` and the question-after-context mode (issues 5 and 9).

Fast tests use a tiny random Llama with a small BPE tokenizer trained here on the haystack. The slow ones (marked)
load the embedded SmolLM2 once. The full-grid retrieval figure (1000-4000 tokens x 5 depths, mean >= 0.9 with the
full cache) is measured by benchmarks/bench_niah_fig5.py and recorded in BENCHMARKS.md; CI checks a 3-point grid.
"""

from __future__ import annotations

import json
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import tiny_llama
from kvreviver_core import niah, plots
from kvreviver_core.cache import make_cache
from kvreviver_core.generation import (
    SplitPrompt, format_prompt, generate_after_context, generate_batch, prefill_context, split_prompts,
)
from kvreviver_core.results import ResultStore

VOCAB = 512


@pytest.fixture(scope="module")
def haystack_text() -> str:
    return niah.load_haystack()


@pytest.fixture(scope="module")
def tiny_tokenizer(haystack_text):
    """A byte-level BPE tokenizer (fast, with offsets) trained on the haystack: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(haystack_text.split("\n\n"), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def tiny_haystack(haystack_text, tiny_tokenizer):
    return niah.Haystack(haystack_text, tiny_tokenizer)


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64, vocab=VOCAB)


# -- needles and scoring ---------------------------------------------------------------------------------------------
def test_score_is_one_on_containment_else_rouge1_recall():
    assert niah.needle_score("60494", "The secret passkey is 60494.") == 1.0
    assert niah.needle_score("Blue Door", "the blue door it is") == 1.0
    # Not contained: 2 of the answer's 3 words are in the output.
    assert niah.needle_score("red door 60494", "The door is 60494") == pytest.approx(2 / 3)
    assert niah.needle_score("60494", "I do not know.") == 0.0


def test_default_needles_are_drawn_per_grid_point_and_repeatable():
    a = niah.grid_needles(0, 1000, 0.5, 3)
    assert a == niah.grid_needles(0, 1000, 0.5, 3)
    assert a != niah.grid_needles(0, 1000, 0.25, 3) and a != niah.grid_needles(1, 1000, 0.5, 3)
    assert len({n.answer for n in a}) == 3 and len({n.question for n in a}) == 3
    for n in a:
        assert n.answer in n.text and re.fullmatch(r"\d{5}", n.answer) and n.answer not in n.question


# -- insertion (issue 5, point 3) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [300, 1000, 3000])
def test_needle_sits_at_the_depth_on_a_sentence_boundary_and_length_is_exact(tiny_tokenizer, tiny_haystack, length):
    haystack = tiny_haystack
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        needle = niah.grid_needles(7, length, depth, 1)[0]
        doc = niah.build_document(haystack, length, depth, [needle])
        tokens = len(tiny_tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        assert abs(tokens - length) <= 0.01 * length
        assert doc.text.count(needle.text) == 1 and doc.text[doc.needle_char:].startswith(needle.text)
        tokens_before = len(tiny_tokenizer(doc.text[: doc.needle_char], add_special_tokens=False)["input_ids"])
        if depth == 1.0:
            assert doc.text.endswith(needle.text)
            continue
        # The haystack around the needle, in the coordinates the depth was asked in.
        insert_at = max(0, doc.needle_char - 1)
        body = doc.text[:insert_at] + doc.text[doc.needle_char + len(doc.needle_block):]
        assert insert_at <= doc.target_char
        # On a sentence boundary (or the very start) ...
        assert insert_at == 0 or any(m.end() == insert_at for m in niah.SENTENCE_END.finditer(body))
        # ... and the last one before the requested depth: no sentence ends between the needle and the depth.
        assert not [m for m in niah.SENTENCE_END.finditer(body) if insert_at < m.end() <= doc.target_char]
        assert tokens_before <= depth * length + 1
        if depth == 0.0:
            assert doc.needle_char == 0


def test_haystack_folder_and_bad_paths(tmp_path):
    (tmp_path / "b.txt").write_text("Second file. It has sentences.")
    (tmp_path / "a.txt").write_text("First file. Also sentences.")
    assert niah.load_haystack(tmp_path).startswith("First file.")
    with pytest.raises(ValueError, match="does not exist"):
        niah.load_haystack(tmp_path / "missing.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        niah.load_haystack(empty)


# -- question after context (issue 9) ------------------------------------------------------------------------------
def _doc(haystack, length=240, depth=0.5, count=2):
    needles = niah.grid_needles(3, length, depth, count)
    return niah.build_document(haystack, length, depth, needles), needles


def test_split_is_exact_and_cuts_before_the_question(tiny_tokenizer, tiny_haystack):
    doc, needles = _doc(tiny_haystack)
    prompts = split_prompts(tiny_tokenizer, doc.text, [n.question for n in needles])
    for prompt, needle in zip(prompts, needles):
        whole = tiny_tokenizer(format_prompt(tiny_tokenizer, doc.text + "\n\n" + needle.question))["input_ids"]
        assert list(prompt.context_ids + prompt.question_ids) == whole
        assert doc.text.startswith(tiny_tokenizer.decode(prompt.context_ids, skip_special_tokens=True))
        assert needle.question in tiny_tokenizer.decode(prompt.question_ids)
    assert prompts[0].context_ids == prompts[1].context_ids


@pytest.mark.parametrize("method", ["full", "h2o"])
def test_full_cache_gives_the_same_tokens_in_both_modes(tiny_lm, tiny_tokenizer, tiny_haystack, method):
    """With the full cache (or a budget of 1.0) the split changes nothing; batches of unequal contexts included."""
    doc, needles = _doc(tiny_haystack)
    other, _ = _doc(tiny_haystack, length=200, depth=0.25)
    pairs = [(doc.text, needles[0].question), (other.text, needles[1].question)]
    formatted = [format_prompt(tiny_tokenizer, c + "\n\n" + q) for c, q in pairs]
    in_prompt = generate_batch(tiny_lm, tiny_tokenizer, formatted, method, 1.0, 12)
    split = [split_prompts(tiny_tokenizer, c, [q])[0] for c, q in pairs]
    after_batched = generate_batch(tiny_lm, tiny_tokenizer, split, method, 1.0, 12)
    after_alone = [generate_after_context(tiny_lm, tiny_tokenizer, [p], method, 1.0, 12)[0] for p in split]
    for a, b, c in zip(in_prompt, after_batched, after_alone):
        assert len(a.token_ids) == 12
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.prompt_tokens == b.prompt_tokens == c.prompt_tokens


def _kept(cache) -> list[list[set[int]]]:
    """Per layer and KV head, the positions SnapKV holds (batch of one)."""
    return [layer.kept_positions()[0] for layer in cache.layers]


def test_snapkv_compresses_the_context_before_seeing_the_question(tiny_lm, tiny_tokenizer, tiny_haystack):
    doc, needles = _doc(tiny_haystack, length=400)
    questions = ["What is the passkey for the red door?", "Which number was said twice in the text above?"]
    prompts = split_prompts(tiny_tokenizer, doc.text, questions)
    context = len(prompts[0].context_ids)
    after: list = []
    for prompt in prompts:
        generate_after_context(tiny_lm, tiny_tokenizer, [prompt], "snapkv", 0.25, 4,
                               after_context=lambda cache: after.append(_kept(cache)))
    assert after[0] == after[1]  # only the question changed: the kept set did not
    assert all(len(head) < 0.3 * context for layer in after[0] for head in layer)  # compressed already
    assert all(max(head) < context for layer in after[0] for head in layer)  # no question token held yet
    # Control: with the question inside the prompt, SnapKV's window sees it and keeps other tokens.
    in_prompt = []
    for prompt in prompts:
        cache = make_cache("snapkv", 0.25, model=tiny_lm)
        ids = torch.tensor([prompt.context_ids + prompt.question_ids])
        prefill_context(tiny_lm, cache, ids, torch.ones_like(ids))
        in_prompt.append([[{p for p in head if p < context} for head in layer] for layer in _kept(cache)])
    assert in_prompt[0] != in_prompt[1]


@pytest.mark.parametrize("method", ["kvreviver", "h2o"])
def test_each_question_starts_from_the_cache_as_it_was_after_the_context(tiny_lm, tiny_tokenizer, tiny_haystack,
                                                                         method):
    doc, needles = _doc(tiny_haystack, length=240, count=2)
    prompts = split_prompts(tiny_tokenizer, doc.text, [n.question for n in needles])
    together = generate_after_context(tiny_lm, tiny_tokenizer, prompts, method, 0.25, 10)
    alone = [generate_after_context(tiny_lm, tiny_tokenizer, [p], method, 0.25, 10)[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert all(g.memory_bytes < 0.5 * g.full_bytes for g in together)


def test_split_prompt_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="at least one question"):
        split_prompts(tiny_tokenizer, "context.", [])
    with pytest.raises(ValueError, match="non-empty"):
        SplitPrompt((1, 2), ())
    with pytest.raises(ValueError, match="share one context"):
        generate_after_context(None, tiny_tokenizer, [SplitPrompt((1,), (2,)), SplitPrompt((3,), (2,))], "full", 1.0, 4)


# -- the grid, resuming, heatmaps, the command ----------------------------------------------------------------------
def test_grid_runs_every_point_and_resumes_after_a_kill(tiny_lm, tiny_tokenizer, haystack_text, tmp_path):
    grid = niah.NiahGrid(methods=["full", "streaming"], budget=0.25, lengths=[150], depths=[0.0, 1.0],
                         questions_per_context=2, max_new_tokens=4)
    path = tmp_path / "results.jsonl"
    steps = []
    record = lambda *args: steps.append(args)  # noqa: E731
    rows = niah.run_niah(tiny_lm, tiny_tokenizer, grid, haystack_text, ResultStore(path, niah.KEY_FIELDS),
                         "tiny", "pydoc", record)
    assert len(rows) == 2 * 2 * 2 and not any(skipped for *_, skipped in steps)
    assert all(0.0 <= r["score"] <= 1.0 and r["mode"] == "after-context" for r in rows)
    assert {r["context_tokens"] for r in rows} == {150}
    assert all(r["memory_ratio"] < 0.5 for r in rows if r["method"] == "streaming")
    # A kill mid-write leaves half a line: that point (both of its questions) is recomputed, nothing else.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])
    steps.clear()
    again = niah.run_niah(tiny_lm, tiny_tokenizer, grid, haystack_text, ResultStore(path, niah.KEY_FIELDS),
                          "tiny", "pydoc", record)
    assert [s for *_, s in steps].count(False) == 1 and len(steps) == 4
    key = lambda r: (r["method"], r["length"], r["depth"], r["question_index"])  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, rows))
    assert {key(r): r["output"] for r in again} == {key(r): r["output"] for r in rows}


def test_heatmap_cells_are_the_jsonl_scores(tmp_path):
    """Rows written to JSONL and read back give the cells; each cell's pixels have its score's colour."""
    from kvreviver_cli.niah_cmd import save_heatmaps

    rng = np.random.default_rng(0)
    methods, depths, lengths = ["full", "snapkv"], [0.0, 0.5, 1.0], [1000, 2000, 4000, 8000]
    store = ResultStore(tmp_path / "results.jsonl", niah.KEY_FIELDS)
    for method in methods:
        for d in depths:
            for n in lengths:
                for q in range(2):  # two questions per cell: the cell is their mean
                    store.append({"method": method, "depth": d, "length": n, "question_index": q,
                                  "score": float(rng.choice([0.0, 0.5, 1.0, rng.random()]))})
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    saved = save_heatmaps(rows, methods, depths, lengths, tmp_path, "test")
    assert [h.path.name for h in saved] == ["heatmap_full.png", "heatmap_snapkv.png", "heatmaps.png"]
    for heatmap in saved:
        image = mpimg.imread(heatmap.path)
        assert image.shape[:2] == (heatmap.size[1], heatmap.size[0])
        for method, matrix in heatmap.matrices.items():
            assert matrix.shape == (len(depths), len(lengths))
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    scores = [r["score"] for r in rows if (r["method"], r["depth"], r["length"]) == (method, d, n)]
                    assert matrix[i, j] == pytest.approx(sum(scores) / len(scores))
                    x, y = np.round(heatmap.cell_centers[method][i, j]).astype(int)
                    assert np.abs(image[y, x, :3] - plots.score_color(matrix[i, j])).max() < 0.02


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_lm, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_lm.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _cli(*args):
    from typer.testing import CliRunner

    from kvreviver_cli.app import app

    return CliRunner().invoke(app, ["niah", *map(str, args)])


def test_command_writes_table_jsonl_and_heatmaps(tiny_model_dir, haystack_text, tmp_path):
    out, haystack = tmp_path / "out", tmp_path / "haystack.txt"
    haystack.write_text(haystack_text[:20000])
    args = ["--model", tiny_model_dir, "--device", "cpu", "--methods", "full,kvreviver:estimator=mean",
            "--lengths", "120", "--depths", "0,1", "--max-new-tokens", 24, "--haystack", haystack,
            "--out", out]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and {r["method"] for r in rows} == {"full", "kvreviver:estimator=mean"}
    assert "kvreviver:estimator=mean" in result.output and "mean" in result.output
    for name in ("heatmap_full.png", "heatmap_kvreviver_estimator=mean.png", "heatmaps.png"):
        assert (out / name).stat().st_size > 1000
    assert _cli(*args).exit_code == 0  # resumed: nothing recomputed, same file
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "10"], "--max-new-tokens must be >= 24"),
    (["--needle", "The key is 5."], "go together"),
    (["--methods", "full,nosuch"], "unknown method 'nosuch'"),
    (["--methods", "kvreviver:estimator=bad"], "unknown estimator"),
    (["--depths", "0,1.5"], "depths must be fractions"),
    (["--haystack", "/nonexistent/haystack.txt"], "does not exist"),
    (["--questions-per-context", "2", "--needle", "N 1.", "--question", "Q?", "--answer", "1"], "must be 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, message):
    result = _cli("--out", tmp_path, *extra)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "results.jsonl").exists()


# -- the embedded SmolLM2 (slow) -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_full_cache_finds_the_needle_and_both_modes_agree(smollm2, haystack_text):
    """Two 1000-token points in CI; the 1000-4000 x 5-depth figure (>= 0.9) is in BENCHMARKS.md (bench_niah_fig5.py)."""
    model, tokenizer = smollm2
    haystack = niah.Haystack(haystack_text, tokenizer)
    grid = niah.NiahGrid(methods=["full"], budget=0.25, lengths=[1000], depths=[0.25, 0.75])
    answers = []
    for length, depth in grid.points():
        needle = grid.needles(length, depth)[0]
        doc = niah.build_document(haystack, length, depth, [needle])
        split = split_prompts(tokenizer, doc.text, [needle.question])
        answers.append(generate_after_context(model, tokenizer, split, "full", 0.25, 32)[0])
        assert tokenizer.decode(split[0].question_ids).startswith("\n\n" + needle.question)
        assert niah.needle_score(needle.answer, answers[-1].text) == 1.0, answers[-1].text
    # The split is exact on the chat template: the question inside the prompt gives the same output tokens.
    in_prompt = generate_batch(model, tokenizer, [format_prompt(tokenizer, doc.text + "\n\n" + needle.question)],
                               "full", 0.25, 32)[0]
    assert in_prompt.token_ids == answers[-1].token_ids


def test_sample_config_runs_the_figure5_methods(tiny_model_dir, tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "sample_configs" / "paper-fig5-niah.toml"
    out = tmp_path / "fig5"
    result = _cli("--config", config, "--model", tiny_model_dir, "--device", "cpu", "--lengths", "100",
                  "--depths", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["full", "kvreviver", "h2o", "streaming", "snapkv", "cam"]
    assert {r["budget"] for r in rows} == {0.25} and {r["mode"] for r in rows} == {"after-context"}


def test_sweep_ratios_runs_niah_once_per_split_and_resumes(tiny_model_dir, tiny_lm, tiny_tokenizer, haystack_text,
                                                            tmp_path):
    """`sweep-ratios --task niah`: one niah grid per split, each split reaching KVReviver's Budget."""
    import csv

    from kvreviver_core.budget import Budget

    out, haystack = tmp_path / "out", tmp_path / "haystack.txt"
    haystack.write_text(haystack_text[:20000])
    splits = [(0.1, 0.45, 0.45), (0.4, 0.3, 0.3)]
    args = ["sweep-ratios", "--task", "niah", "--splits", ";".join(",".join(map(str, s)) for s in splits),
            "--budget", "0.3", "--model", tiny_model_dir, "--device", "cpu", "--lengths", "150", "--depths", "0,1",
            "--max-new-tokens", "24", "--haystack", haystack, "--out", out]
    from typer.testing import CliRunner

    from kvreviver_cli.app import app

    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    specs = ["kvreviver:split=0.1/0.45/0.45", "kvreviver:split=0.4/0.3/0.3"]
    assert sorted({r["method"] for r in rows}) == sorted(["full", *specs]) and len(rows) == 3 * 2
    with (out / "sweep.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(float(t["vague"]), float(t["candidate"]), float(t["recent"])) for t in table] == splits
    for split, spec, line in zip(splits, specs, table):
        mine = [r for r in rows if r["method"] == spec]
        assert float(line["score"]) == pytest.approx(sum(r["score"] for r in mine) / len(mine))
        # The same point answered directly with a Budget built from the split gives the row's output.
        row = mine[0]
        needle = niah.Needle(row["needle"], row["question"], row["answer"])
        stack = niah.Haystack(haystack.read_text(), tiny_tokenizer).repeated_to(150 + 64)
        document = niah.build_document(stack, row["length"], row["depth"], [needle])
        prompt = split_prompts(tiny_tokenizer, document.text, [needle.question], niah.SEPARATOR)
        direct = generate_after_context(tiny_lm, tiny_tokenizer, prompt, "kvreviver", Budget(0.3, split=split), 24)
        assert direct[0].text == row["output"]
    assert "Vague Ratio" in result.output and "needle score" in result.output

    again = CliRunner().invoke(app, list(map(str, args)))
    assert again.exit_code == 0, again.output
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)  # nothing recomputed
