"""`kvreviver eval` end to end on a tiny Llama saved with save_pretrained (the real loading path) and a tiny JSONL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvreviver_core import metrics

ROOT = Path(__file__).resolve().parents[1]
ARTICLES = [
    ("The city council voted on Monday to build a new library near the river, after years of debate about "
     "its cost. The library will open in two years and hold a million books.",
     "The city council voted to build a new library by the river."),
    ("A small robot rover found traces of ancient water on the red planet, scientists said. The rover has "
     "been driving across the dusty crater for three years.",
     "A rover found signs of ancient water on Mars."),
    ("The national football team won the final match with a late goal, and thousands of fans celebrated in "
     "the streets of the capital until dawn.",
     "The national team won the final with a late goal."),
    ("Bakers across the country report that the price of flour has doubled this year, and many small shops "
     "have raised the price of bread.",
     "Flour prices doubled, so bakeries raised bread prices."),
]


def save_tiny_model(folder: Path) -> Path:
    """A 2-layer Llama (GQA) with a 400-token BPE trained on builtin prose and a chat template, saved as a model dir."""
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([topics[name] for name in sorted(topics)[:10]], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_articles(path: Path, count: int = len(ARTICLES)) -> Path:
    rows = [{"document": doc, "summary": ref} for doc, ref in (ARTICLES * 4)[:count]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def articles(tmp_path) -> Path:
    return write_articles(tmp_path / "articles.jsonl")


def run_cli(*args: str):
    from kvreviver_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


@dataclass
class CountingGenerate:
    """Wraps the real generate_batch and counts the prompts it decodes."""

    real: object
    prompts: int = 0

    def __call__(self, model, tokenizer, prompts, *args, **kwargs):
        self.prompts += len(prompts)
        return self.real(model, tokenizer, prompts, *args, **kwargs)


@pytest.fixture()
def counting(monkeypatch) -> CountingGenerate:
    from kvreviver_core import generation

    counter = CountingGenerate(generation.generate_batch)
    monkeypatch.setattr(generation, "generate_batch", counter)
    return counter


def test_eval_scores_against_references_and_the_full_cache(tiny, articles, tmp_path):
    out = tmp_path / "out"
    result = run_cli("eval", "--model", tiny, "--dataset", articles, "--methods", "kvreviver,streaming",
                     "--budget", "0.3,1.0", "--max-new-tokens", "6", "--batch-size", "3", "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert len(rows) == len(ARTICLES) * (1 + 2 * 2)  # full once, then 2 methods x 2 budgets
    full = {r["prompt_id"]: r for r in rows if r["method"] == "full"}
    references = {f"line-{i + 1}": ref for i, (_, ref) in enumerate(ARTICLES)}
    for row in rows:
        # Scores recomputed independently from the stored texts.
        assert row["reference_rouge"] == metrics.rouge_f(references[row["prompt_id"]], row["text"])
        assert row["rougeL_vs_full"] == metrics.rouge_l_f(full[row["prompt_id"]]["text"], row["text"])
        if row["budget"] == 1.0:  # an unlimited budget keeps every token exactly: the full cache's output
            assert row["token_ids"] == full[row["prompt_id"]]["token_ids"]
        if row["budget"] == 0.3 and row["batch_size"] == 1:  # a batch's left padding is held too
            assert row["memory_bytes"] <= 0.3 * row["full_bytes"]
    summary = json.loads((out / "summary.json").read_text())
    by_run = {(r["method"], r["budget"]): r for r in summary["runs"]}
    assert by_run[("kvreviver", 1.0)]["rougeL_vs_full"] == 1.0 and by_run[("kvreviver", 1.0)]["first_token_match"] == 1.0
    assert by_run[("streaming", 0.3)]["memory_fraction"] < 0.35
    assert "ROUGE-1 (ref)" in result.output and "ROUGE-L vs full" in result.output


def test_method_specs_run_with_their_options(tiny, articles, tmp_path):
    """``name:key=value`` runs the method with those options: at an unlimited budget the linear combine (no token
    leaves the exact store) gives the full cache's tokens, and its rows are labelled by the whole spec."""
    out = tmp_path / "out"
    spec = "kvreviver:combine=mean:split=0.2/0.4/0.4"
    result = run_cli("eval", "--model", tiny, "--dataset", articles, "--methods", spec, "--budget", "0.3,1.0",
                     "--max-new-tokens", "6", "--batch-size", "3", "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    full = {r["prompt_id"]: r for r in rows if r["method"] == "full"}
    ours = [r for r in rows if r["method"] == spec]
    assert len(ours) == 2 * len(ARTICLES)
    for row in ours:
        if row["budget"] == 1.0:
            assert row["token_ids"] == full[row["prompt_id"]]["token_ids"]
        elif row["batch_size"] == 1:
            assert row["memory_bytes"] <= 0.3 * row["full_bytes"]
    bad = run_cli("eval", "--model", tiny, "--dataset", articles, "--methods", "kvreviver:combine=max")
    assert bad.exit_code == 2 and "unknown row combine" in bad.output


def test_builtin_reports_fidelity_only_and_says_so(tiny, tmp_path):
    result = run_cli("eval", "--model", tiny, "--methods", "full,h2o", "--limit", "2", "--max-context", "160",
                     "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "(ref)" not in result.output
    assert "ROUGE-L vs full" in result.output and "no reference summaries" in result.output


def test_config_file_with_flags_winning(tiny, articles, tmp_path, counting):
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{tiny}"\ndataset = "{articles}"\nmethods = ["full", "snapkv"]\nbudget = [0.5]\n'
                      f"limit = 3\nmax_new_tokens = 4\n")
    out = tmp_path / "out"
    result = run_cli("eval", "--config", config, "--limit", "2", "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert {(r["method"], r["budget"]) for r in rows} == {("full", None), ("snapkv", 0.5)}
    assert len(rows) == 2 * 2 and counting.prompts == 4  # --limit 2 beat the file's 3
    assert all(r["new_tokens"] <= 4 for r in rows)


def test_a_killed_run_resumes_without_recomputing_or_losing_rows(tiny, tmp_path, counting):
    out = tmp_path / "out"
    articles = write_articles(tmp_path / "articles.jsonl", 6)
    args = ["eval", "--model", str(tiny), "--dataset", str(articles), "--methods", "full,streaming",
            "--budget", "0.5", "--max-new-tokens", "16", "--batch-size", "1", "--limit", "6", "--out", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "kvreviver_cli", *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = read_rows(out)
    assert 3 <= len(before) < 12, "the run was to be killed part-way"

    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    after = read_rows(out)
    assert after[: len(before)] == before  # nothing lost or rewritten
    assert len(after) == 12 and len({(r["prompt_id"], r["method"]) for r in after}) == 12
    assert counting.prompts == 12 - len(before)  # only the missing rows were generated


@pytest.mark.parametrize("flags, message", [
    (["--budget", "1.5"], "budget fraction must be in (0, 1], got 1.5"),
    (["--split", "0.5,0.5,0.5"], "split must sum to 1"),
    (["--methods", "full,nosuch"], "unknown method 'nosuch'"),
    (["--dataset", "missing.jsonl"], "dataset file missing.jsonl does not exist"),
    (["--dataset", "BAD"], ":2: not valid JSON"),
    (["--limit", "-1"], "--limit must be 0 (all) or a positive number"),
    (["--model", "/no/such/model"], "model folder /no/such/model does not exist"),
])
def test_bad_input_exits_2_with_one_line(tiny, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"document": "a", "summary": "b"}\n{"document": \n')
    flags = [str(tmp_path / "bad.jsonl") if f == "BAD" else f for f in flags]
    defaults = {"--model": str(tiny), "--methods": "full"}
    result = run_cli("eval", *[x for flag, value in defaults.items() if flag not in flags for x in (flag, value)],
                     *flags)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_xsum_without_network_or_cache_exits_2(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "kvreviver_cli", "eval", "--dataset", "xsum"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot load xsum" in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.fixture()
def method_needing_calibration():
    """A registered method whose prepare() fails as a calibrated method does when its file is missing."""
    from dataclasses import dataclass as dc

    from kvreviver_core.methods import METHODS, Method, register

    @register("needs-calibration")
    @dc
    class NeedsCalibration(Method):
        def prepare(self, model) -> None:
            raise ValueError("needs-calibration weights file not found: create it with `kvreviver calibrate`")

    yield "needs-calibration"
    del METHODS["needs-calibration"]


def test_default_methods_skip_an_uncalibrated_one_but_an_explicit_one_fails(tiny, articles, method_needing_calibration):
    skipped = run_cli("eval", "--model", tiny, "--dataset", articles, "--limit", "1", "--max-new-tokens", "2")
    assert skipped.exit_code == 0, skipped.output
    assert f"skipping {method_needing_calibration}" in skipped.output and "streaming" in skipped.output
    explicit = run_cli("eval", "--model", tiny, "--dataset", articles, "--methods", method_needing_calibration)
    assert explicit.exit_code == 2
    assert "weights file not found" in explicit.output and len(explicit.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
@pytest.mark.parametrize("command", [["eval"], ["niah"], ["sweep-ratios", "--table", "2"]])
@pytest.mark.parametrize("flags, message", [
    (["--device-map", "auto"], "no NVIDIA GPU was found"),
    (["--device-map", "balanced"], "--device-map takes auto"),
    (["--device-map", "auto", "--device", "cpu"], "cannot go with --device cpu"),
])
def test_device_map_needs_gpus_one_line_exit_2(command, flags, message, tmp_path):
    result = run_cli(*command, *flags, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out" / "results.jsonl").exists()
