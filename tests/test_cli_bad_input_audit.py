"""Bad input found by an audit of every command: each gives one ``error:`` line and exit code 2, early, and leaves
files already written as they were.

The runs go through the app in process (``CliRunner``), but one that needs the real stderr. Those that load a model
load a tiny Llama saved in the test (the real loading path) or a random-weight preset, never a download; the rest
fail before any model load.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvreviver_core.niah import NiahGrid
from kvreviver_core.results import ResultStore
from tests.test_eval import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY_PROFILE = ["profile", "--arch", "tiny", "--random-weights", "--device", "cpu", "--methods", "full",
                "--batch", "1", "--context", "16", "--new-tokens", "2"]
NO_MODEL = ["--model", "/no/such/model"]  # reached only if the check under test is missing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("audit-tiny-llama"))


def run_cli(*args: str | Path):
    from kvreviver_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one line of a bad-input run, after checking exit code 2 and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- an existing results file a resumed run reads ---------------------------------------------------------------------
def test_complete_malformed_last_results_line_is_reported_not_dropped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"method": "full"}\nnot json\n')  # ends with its newline: not a write torn by a kill
    before = digest(path)
    with pytest.raises(ValueError, match=r"results.jsonl:2: malformed results line"):
        ResultStore(path, ("method",))
    assert digest(path) == before


@pytest.mark.parametrize("text", ["notes about a run", '{"method": "full"}\nnot json'])
def test_a_last_line_without_newline_that_is_no_row_is_reported_not_truncated(tmp_path, text):
    path = tmp_path / "results.jsonl"
    path.write_text(text)  # no newline at the end, but no row's start either: not a write torn by a kill
    before = digest(path)
    with pytest.raises(ValueError, match="malformed results line"):
        ResultStore(path, ("method",))
    assert digest(path) == before


def test_a_torn_last_row_is_dropped_and_the_rows_before_it_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"method": "full"}\n{"method": "h2o", "sc')
    assert [row["method"] for row in ResultStore(path, ("method",)).rows] == ["full"]
    assert path.read_text() == '{"method": "full"}\n'


def test_profile_keeps_a_malformed_profile_jsonl(tmp_path):
    out = tmp_path / "prof"
    out.mkdir()
    (out / "profile.jsonl").write_text("garbage\n")
    before = digest(out / "profile.jsonl")
    line = error_line(run_cli(*TINY_PROFILE, "--out", out))
    assert "profile.jsonl:1: malformed results line" in line
    assert digest(out / "profile.jsonl") == before and not (out / "profile.json").exists()


def test_profile_rejects_another_commands_rows(tmp_path):
    out = tmp_path / "prof"
    out.mkdir()
    (out / "profile.jsonl").write_text('{"prompt_id": "x", "method": "full"}\n')  # an eval row, say
    before = digest(out / "profile.jsonl")
    line = error_line(run_cli(*TINY_PROFILE, "--out", out))
    assert "profile.jsonl:1: row has no setup, batch: not this command's results" in line
    assert digest(out / "profile.jsonl") == before


def test_niah_rejects_another_commands_rows_before_the_model_loads(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"prompt_id": "x", "method": "full"}\n')  # an eval row
    before = digest(tmp_path / "results.jsonl")
    line = error_line(run_cli("niah", "--methods", "full", "--lengths", "500", "--out", tmp_path, *NO_MODEL))
    assert "results.jsonl:1: row has no " in line and "not this command's results" in line
    assert digest(tmp_path / "results.jsonl") == before


def test_non_utf8_results_file_is_named(tmp_path):
    out = tmp_path / "prof"
    out.mkdir()
    (out / "profile.jsonl").write_bytes(b"\xff\xfe\x00\n")
    line = error_line(run_cli(*TINY_PROFILE, "--out", out))
    assert f"{out / 'profile.jsonl'}: not a results file (not UTF-8 text)" in line


# -- --out ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, where, message", [
    ("niah", "file", "exists and is not a folder"),
    ("niah", "under-file", "cannot be created: {file} is a file, not a folder"),
    ("eval", "under-file", "cannot be created: {file} is a file, not a folder"),
    ("profile", "file", "exists and is not a folder"),
    ("profile", "under-file", "cannot be created: {file} is a file, not a folder"),
    ("calibrate", "folder", "exists and is a folder"),
    ("calibrate", "under-file", "cannot be created: {file} is a file, not a folder"),
])
def test_unusable_out_fails_before_any_work(tiny, tmp_path, command, where, message):
    file = tmp_path / "taken.txt"
    file.write_text("keep me\n")
    name = "w.safetensors" if command == "calibrate" else "out"
    out = {"file": file, "under-file": file / name, "folder": tmp_path / name}[where]
    if where == "folder":
        out.mkdir()
    flags = {
        "niah": ["niah", "--model", tiny, "--methods", "full", "--lengths", "64", "--depths", "0"],
        "eval": ["eval", "--model", tiny, "--methods", "full", "--limit", "1", "--max-new-tokens", "1"],
        "profile": TINY_PROFILE,
        "calibrate": ["calibrate", "--method", "vector", "--model", tiny, "--tokens", "1024", "--device", "cpu"],
    }[command]
    line = error_line(run_cli(*flags, "--out", out))
    assert f"--out {out} " + message.format(file=file) in line
    assert file.read_text() == "keep me\n"


# -- checks that came only after the model load -----------------------------------------------------------------------
def test_too_many_questions_per_context_fail_before_the_model_loads():
    line = error_line(run_cli("niah", "--questions-per-context", "50", *NO_MODEL))
    assert "questions per context must be between 1 and 20, got 50" in line
    with pytest.raises(ValueError, match="between 1 and 20"):
        NiahGrid(methods=["full"], budget=0.25, lengths=[64], depths=[0.0], questions_per_context=21)


def test_negative_decode_warmup_fails_before_the_model_loads():
    line = error_line(run_cli("profile", "--device", "cpu", "--decode-warmup", "-1", *NO_MODEL))
    assert "--decode-warmup must be >= 0, got -1" in line


def test_an_error_after_the_model_load_is_still_one_line(tiny):
    # transformers' "Loading weights" progress bar came first on stderr (in every command but eval). A real process:
    # the bar writes to the process's stderr, which CliRunner does not see.
    done = subprocess.run([sys.executable, "-m", "kvreviver_cli", "profile", "--model", str(tiny), "--device", "cpu",
                           "--methods", "full", "--batch", "1", "--context", "5000", "--new-tokens", "2"],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == [
        "error: --context + --new-tokens = 5002 exceeds the model's 4096 positions"], done.stderr


# -- model, dataset and config files ----------------------------------------------------------------------------------
def test_empty_model_folder_says_it_cannot_load_from_it(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    line = error_line(run_cli("eval", "--model", folder, "--methods", "full"))
    assert f"cannot load model from {folder}: " in line and "tokenizer" in line


@pytest.mark.parametrize("kind, message", [
    ("binary", "dataset file {path} is not UTF-8 text"),
    ("folder", "dataset file {path} is not a file"),
])
def test_unreadable_dataset_file_is_named(tmp_path, kind, message):
    path = tmp_path / "data.jsonl"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b'\xff\xfe{"document": "x"}\n')
    line = error_line(run_cli("eval", "--dataset", path, "--methods", "full", *NO_MODEL))
    assert message.format(path=path) in line


@pytest.mark.parametrize("kind, message", [
    ("binary", "config file {path} is not valid TOML: not UTF-8 text"),
    ("folder", "config file {path} is not a file"),
    ("bool-for-int", "config file {path}: bad value for limit: a boolean (true), but --limit is not an on/off flag"),
    ("float-for-int", "config file {path}: bad value for limit: 3.0, but --limit takes an integer"),
])
def test_bad_config_file_is_named(tmp_path, kind, message):
    path = tmp_path / "run.toml"
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe[eval]\n")
    else:
        path.write_text(f"[eval]\nlimit = {'true' if kind == 'bool-for-int' else '3.0'}\n")
    line = error_line(run_cli("eval", "--config", path, "--methods", "full", *NO_MODEL))
    assert message.format(path=path) in line


def test_a_number_for_an_on_off_flag_in_a_config_file_is_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[profile]\ncuda-graphs = 1\n")
    line = error_line(run_cli("profile", "--config", path, "--device", "cpu"))
    assert f"config file {path}: bad value for cuda_graphs: 1, but --cuda-graphs is an on/off flag: write true or " \
           "false" in line


# -- calibrate: checks that came only after the activations, or under the progress display ---------------------------
def test_an_echokv_group_size_the_kv_heads_cannot_take_fails_before_any_activation(tiny, tmp_path, monkeypatch):
    from kvreviver_core import calibration

    def collect(*args, **kwargs):
        raise AssertionError("activations collected before the options were checked")

    monkeypatch.setattr(calibration, "calibrate_on", collect)
    line = error_line(run_cli("calibrate", "--method", "echokv", "--model", tiny, "--device", "cpu",
                              "--group-size", "3", "--out", tmp_path / "w.safetensors"))
    assert "echokv group size must divide the 2 KV heads, got 3" in line  # the tiny Llama has 2


def test_a_text_too_short_for_the_tokens_is_one_line_alone(tiny, tmp_path):
    # A real process: the progress display writes to the process's stderr, which CliRunner does not see whole.
    text = tmp_path / "short.txt"
    text.write_text("a few words only\n")
    done = subprocess.run([sys.executable, "-m", "kvreviver_cli", "calibrate", "--method", "vector", "--model",
                           str(tiny), "--device", "cpu", "--text", str(text), "--out", str(tmp_path / "w.safetensors")],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"error: the calibration text has \d+ tokens; it needs at least 1024 "
                                            r"\(2 chunks of 512\)", lines[0]), done.stderr
    assert not (tmp_path / "w.safetensors").exists()
