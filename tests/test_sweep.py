"""`kvreviver sweep-ratios`: the paper's grids, one kvreviver run per split, CSV, resume, bad input."""

from __future__ import annotations

import csv

import pytest
from test_eval import counting, read_rows, run_cli, save_tiny_model  # noqa: F401  (counting is a fixture)

from kvreviver_cli.sweep_cmd import PAPER_TABLES

TABLE_2 = [(0.1, 0.45, 0.45), (0.15, 0.425, 0.425), (0.2, 0.4, 0.4), (0.3, 0.35, 0.35), (0.4, 0.3, 0.3)]
TABLE_3 = [(0.1, 0.7, 0.2), (0.1, 0.6, 0.3), (0.1, 0.5, 0.4), (0.1, 0.45, 0.45), (0.1, 0.4, 0.5), (0.1, 0.3, 0.6)]


def test_the_grids_are_the_papers():
    assert [split for split, _ in PAPER_TABLES["2"]] == TABLE_2
    assert [split for split, _ in PAPER_TABLES["3"]] == TABLE_3
    assert [r1 for _, r1 in PAPER_TABLES["2"]] == [35.7, 35.2, 34.4, 34.1, 33.3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_table_2_sweep_prints_five_rows_and_resumes_without_recomputing(tiny, tmp_path, counting):  # noqa: F811
    out = tmp_path / "sweep"
    common = ["--task", "eval", "--limit", "2", "--model", tiny, "--max-context", "160", "--max-new-tokens", "4",
              "--out", out]
    # A sweep stopped after its first two splits...
    first = run_cli("sweep-ratios", "--splits", "0.1,0.45,0.45;0.15,0.425,0.425", *common)
    assert first.exit_code == 0, first.output
    assert counting.prompts == 2 * 3  # full once, then kvreviver at each split
    assert len(read_csv(out / "sweep.csv")) == 2
    rows_before = read_rows(out)

    # ...then the whole of Table 2: only the three new splits run.
    counting.prompts = 0
    result = run_cli("sweep-ratios", "--table", "2", *common)
    assert result.exit_code == 0, result.output
    assert counting.prompts == 2 * 3
    assert read_rows(out)[: len(rows_before)] == rows_before
    table = read_csv(out / "sweep.csv")
    assert [(float(r["vague"]), float(r["candidate"]), float(r["recent"])) for r in table] == TABLE_2
    assert all(r["score_name"] == "ROUGE-L vs full" and 0.0 <= float(r["score"]) <= 1.0 for r in table)
    for vague, candidate, recent in TABLE_2:  # five printed rows in the paper's layout
        assert f"│ {vague:>11g} │ {candidate:>15g} │ {recent:>12g} │" in result.output
    assert "Vague Ratio" in result.output and "paper ROUGE-1" in result.output

    # A finished sweep rerun computes nothing.
    counting.prompts = 0
    again = run_cli("sweep-ratios", "--table", "2", *common)
    assert again.exit_code == 0 and counting.prompts == 0
    assert read_csv(out / "sweep.csv") == table


@pytest.mark.parametrize("flags, message", [
    (["--table", "4"], "unknown --table '4'"),
    (["--splits", "0.1,0.5,0.5"], "split must sum to 1"),
    (["--splits", "0.1,0.9"], "split must have 3 parts"),
    (["--table", "2", "--splits", "0.1,0.45,0.45"], "give either --table"),
    ([], "give either --table"),
    (["--table", "2", "--budget", "1.5"], "budget fraction must be in (0, 1]"),
    (["--table", "2", "--task", "qa"], "unknown --task 'qa'"),
    (["--table", "2", "--task", "niah", "--max-new-tokens", "8"], "--max-new-tokens must be >= 24"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, flags, message):
    result = run_cli("sweep-ratios", *flags, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
