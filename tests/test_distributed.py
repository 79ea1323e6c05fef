"""Sharding over torchrun ranks (issue 10): the shard assignment, the rank files' fold, and real 2-process runs.

The end-to-end tests start ``python -m torch.distributed.run --nproc-per-node 2`` (gloo, CPU) on a tiny Llama and
compare the merged results.jsonl with a single-process run of the same command, row for row (wall time aside).
Both use one thread per process (torchrun gives each worker one), since the thread count can change float sums.
Equal rows would also come out of ranks that each ran everything (the fold drops duplicate keys), so the workers
log every generation they run (a ``sitecustomize`` on their path wraps the generation calls), and the tests check
who ran what: each item once, on the rank the assignment gives it, and no row that was already stored.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvreviver_core import distributed, niah
from kvreviver_core.distributed import RankInfo, assign, fold_rank_files, rank_file, rank_store
from test_eval import save_tiny_model, write_articles

ROOT = Path(__file__).resolve().parents[1]
WALL_TIME_FIELDS = ("seconds", "finished_at")
NIAH_ARGS = ["--methods", "full,h2o", "--budget", "0.3", "--lengths", "100,160", "--depths", "0,0.5,1",
             "--max-new-tokens", "24", "--device", "cpu"]
EVAL_ARGS = ["--methods", "full,h2o", "--budget", "0.3", "--limit", "5", "--batch-size", "2", "--max-new-tokens", "6",
             "--device", "cpu"]


# -- who runs what -----------------------------------------------------------------------------------------------------
def _loads(costs, owner, world_size):
    loads = [0.0] * world_size
    for cost, rank in zip(costs, owner):
        loads[rank] += cost
    return loads


def test_assignment_is_complete_deterministic_and_balanced():
    rng = random.Random(0)
    for trial in range(40):
        world = rng.choice([2, 3])
        costs = [rng.choice([100, 1000, 2000, 4000]) + rng.random() for _ in range(rng.randint(1, 12))]
        owner = assign(costs, world)
        assert owner == assign(list(costs), world)  # every rank computes the same
        assert len(owner) == len(costs) and set(owner) <= set(range(world))
        shards = [distributed.my_items(costs, RankInfo(rank, world, rank)) for rank in range(world)]
        assert sorted(sum(shards, [])) == list(range(len(costs)))  # disjoint and complete
        counts = [owner.count(rank) for rank in range(world)]
        assert max(counts) - min(counts) <= 1
        loads = _loads(costs, owner, world)
        assert max(loads) - min(loads) <= max(costs) + 1e-9
    assert sorted(assign([5.0] * 7, 3)) == [0, 0, 0, 1, 1, 2, 2]


def test_the_figure5_grid_splits_evenly_over_two_ranks():
    """4 lengths x 5 depths: each rank gets 10 points and every length on both ranks (answer time on a GPU is
    mostly decode steps, the same for every point)."""
    points = [(n, d) for n in (1000, 2000, 4000, 8000) for d in range(5)]
    owner = assign([n + 32 for n, _ in points], 2)
    assert owner.count(0) == owner.count(1) == 10
    for length in (1000, 2000, 4000, 8000):
        assert {owner[i] for i, (n, _) in enumerate(points) if n == length} == {0, 1}
    loads = _loads([n for n, _ in points], owner, 2)
    assert abs(loads[0] - loads[1]) <= 8000


def test_rank_info_from_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert RankInfo.from_env() == RankInfo() and not RankInfo().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert RankInfo.from_env() == RankInfo(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, 4\)"):
        RankInfo.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        RankInfo.from_env()
    assert distributed.rank_device("cpu", RankInfo(1, 2, 1)) == "cpu"


# -- rank files --------------------------------------------------------------------------------------------------------
KEY = ("point", "method")


def _write(path: Path, rows: list[dict], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows) + torn)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_fold_adds_new_keys_once_keeps_the_results_file_and_deletes_rank_files(tmp_path):
    results = tmp_path / "results.jsonl"
    old = [{"point": 0, "method": "full", "score": 1.0}]
    results.write_text(json.dumps(old[0]) + "\n")  # not sort_keys: its bytes must stay as they are
    before = results.read_text()
    rank0 = [{"point": 1, "method": "full", "score": 0.5}]
    rank1 = [{"point": 2, "method": "full", "score": 0.25}, {"point": 0, "method": "full", "score": 9.0}]
    stale = [{"point": 3, "method": "h2o", "score": 0.0}]  # left by a killed 3-process run
    _write(rank_file(results, RankInfo(0, 2, 0)), rank0)
    _write(rank_file(results, RankInfo(1, 2, 1)), rank1, torn='{"point": 4, "meth')  # killed mid-write
    _write(rank_file(results, RankInfo(2, 3, 2)), stale)
    (tmp_path / "results.rankX-of-2.jsonl").write_text("not ours\n")

    assert fold_rank_files(results, KEY) == 3
    assert results.read_text().startswith(before)
    assert _rows(results) == old + rank0 + rank1[:1] + stale  # the duplicate of point 0 is dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "results.rankX-of-2.jsonl"]
    assert fold_rank_files(results, KEY) == 0 and _rows(results) == old + rank0 + rank1[:1] + stale


@pytest.mark.parametrize("foreign", ["results", "rank file"])
def test_a_rank_refuses_another_commands_rows_and_appends_nothing(tmp_path, foreign):
    results = tmp_path / "results.jsonl"
    target = results if foreign == "results" else rank_file(results, RankInfo(1, 2, 1))
    _write(target, [{"prompt_id": "x", "method": "full"}])  # an eval row: no point
    before = target.read_bytes()
    with pytest.raises(ValueError, match=r":1: row has no point: not this command's results"):
        rank_store(results, KEY, RankInfo(1, 2, 1))
    assert target.read_bytes() == before


def test_a_kill_during_the_fold_loses_no_row(tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    _write(results, [{"point": 0, "method": "full"}])
    mine = [{"point": 1, "method": "full"}, {"point": 2, "method": "full"}]
    _write(rank_file(results, RankInfo(1, 2, 1)), mine)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # killed before the rename: the old file and the rank file are intact
        patch.setattr(Path, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            fold_rank_files(results, KEY)
    assert len(_rows(results)) == 1 and _rows(rank_file(results, RankInfo(1, 2, 1))) == mine
    with monkeypatch.context() as patch:  # killed after the rename, before the rank file went
        patch.setattr(Path, "unlink", killed)
        with pytest.raises(KeyboardInterrupt):
            fold_rank_files(results, KEY)
    assert len(_rows(results)) == 3 and rank_file(results, RankInfo(1, 2, 1)).exists()
    fold_rank_files(results, KEY)  # the next run's fold: no duplicates
    assert [r["point"] for r in _rows(results)] == [0, 1, 2] and not rank_file(results, RankInfo(1, 2, 1)).exists()


def test_a_rank_store_skips_merged_rows_and_writes_only_its_file(tmp_path):
    results = tmp_path / "results.jsonl"
    _write(results, [{"point": 0, "method": "full"}])
    store = rank_store(results, KEY, RankInfo(1, 2, 1))
    assert store.has(point=0, method="full") and not store.has(point=1, method="full")
    store.append({"point": 1, "method": "full"})
    assert len(_rows(results)) == 1 and _rows(rank_file(results, RankInfo(1, 2, 1))) == [{"point": 1, "method": "full"}]
    with pytest.raises(ValueError, match="WORLD_SIZE > 1"):
        distributed.RankSession(results, KEY, RankInfo())


# -- two real processes ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def haystack(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("haystack") / "haystack.txt"
    path.write_text(niah.load_haystack()[:20000])
    return path


@pytest.fixture()
def one_thread():
    """The single-process reference at torchrun's one thread per worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _single(*args) -> None:
    from kvreviver_cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Loaded by each torchrun worker (RANK set) before the command runs: log the generations it runs, as JSON lines.
CALL_LOG = """
import json, os

if "RANK" in os.environ:
    from kvreviver_core import generation, niah

    def log(entry):
        with open(os.environ["KVREVIVER_TEST_CALL_LOG"], "a") as handle:
            handle.write(json.dumps({"rank": int(os.environ["RANK"]), **entry}) + "\\n")

    def answer_questions(model, tokenizer, grid, method, document, needles, real=niah.answer_questions):
        log({"method": method, "answer": needles[0].answer})
        return real(model, tokenizer, grid, method, document, needles)

    def generate_batch(model, tokenizer, prompts, method, *args, real=generation.generate_batch, **kwargs):
        log({"method": method, "prompts": len(prompts)})
        return real(model, tokenizer, prompts, method, *args, **kwargs)

    niah.answer_questions, generation.generate_batch = answer_questions, generate_batch
"""


def _torchrun(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run a command on 2 ranks; return the finished process and the generations the ranks logged."""
    hook = tmp_path / "call-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CALL_LOG)
    calls = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", KVREVIVER_TEST_CALL_LOG=str(calls),
               PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [env.get("PYTHONPATH")])]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), "-m", "kvreviver_cli", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, _rows(calls) if calls.exists() else []


def _canonical(rows: list[dict]) -> list[dict]:
    bare = [{k: v for k, v in row.items() if k not in WALL_TIME_FIELDS} for row in rows]
    return sorted(bare, key=lambda row: json.dumps(row, sort_keys=True))


@pytest.fixture(scope="module")
def niah_reference(tiny, haystack, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("niah-single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _single("niah", "--model", tiny, "--haystack", haystack, *NIAH_ARGS, "--out", out)
    finally:
        torch.set_num_threads(threads)
    rows = _rows(out / "results.jsonl")
    assert len(rows) == 2 * 3 * 2
    return rows


def test_two_ranks_give_the_single_process_rows_and_resume_a_killed_run(tiny, haystack, niah_reference, tmp_path):
    """One 2-process run (CI time) that also resumes: rows a killed run left in rank files, marked by a negative
    wall time, are kept and not recomputed; every other row is computed by the two ranks and equals the reference."""
    out = tmp_path / "out"
    out.mkdir()
    points = [(n, d) for n in (100, 160) for d in (0.0, 0.5, 1.0)]
    owner = assign([n + 24 for n, _ in points], 2)
    rank1_point = points[owner.index(1)]
    finished = [{**row, "seconds": -1} for row in niah_reference if (row["length"], row["depth"]) == rank1_point]
    _write(rank_file(out / "results.jsonl", RankInfo(1, 2, 1)), finished, torn='{"model": "tin')
    other_size = [{**niah_reference[-1], "seconds": -3}]  # from a killed 3-process run
    _write(rank_file(out / "results.jsonl", RankInfo(2, 3, 2)), other_size)

    done, calls = _torchrun(tmp_path, "niah", "--model", tiny, "--haystack", haystack, *NIAH_ARGS, "--out", out)
    merged = _rows(out / "results.jsonl")
    assert _canonical(merged) == _canonical(niah_reference)
    assert sorted(r["seconds"] for r in merged if r["seconds"] < 0) == [-3] + [-1] * len(finished)
    # Who ran what: each (point, method) once, on its rank, except the rows already stored.
    point_of = {row["answer"]: (row["length"], row["depth"]) for row in niah_reference}
    ran = [(call["rank"], point_of[call["answer"]], call["method"]) for call in calls]
    stored = {((r["length"], r["depth"]), r["method"]) for r in finished + other_size}
    expected = {(owner[points.index(p)], p, m) for p in points for m in ("full", "h2o") if (p, m) not in stored}
    assert sorted(ran) == sorted(expected) and len(ran) == 2 * 6 - 3
    assert {rank for rank, _, _ in ran} == {0, 1}
    assert sorted(p.name for p in out.glob("results*")) == ["results.jsonl"]  # rank files folded away
    assert done.stdout.count("NIAH, ") == 1 and done.stdout.count("results: ") == 1  # rank 0 alone prints
    assert (out / "heatmaps.png").stat().st_size > 1000


def test_eval_on_two_ranks_gives_the_single_process_rows(tiny, tmp_path, one_thread):
    articles = write_articles(tmp_path / "articles.jsonl", 5)
    _single("eval", "--model", tiny, "--dataset", articles, *EVAL_ARGS, "--out", tmp_path / "single")
    reference = _rows(tmp_path / "single" / "results.jsonl")
    assert len(reference) == 5 * 2
    _, calls = _torchrun(tmp_path, "eval", "--model", tiny, "--dataset", articles, *EVAL_ARGS,
                         "--out", tmp_path / "ranks")
    merged = _rows(tmp_path / "ranks" / "results.jsonl")
    assert _canonical(merged) == _canonical(reference)
    # Batches of 2, 2 and 1 prompts: the two batches of 2 on different ranks, each prompt decoded once per method.
    per_rank = {rank: sum(c["prompts"] for c in calls if c["rank"] == rank) for rank in (0, 1)}
    assert sum(per_rank.values()) == 5 * 2 and sorted(per_rank.values()) == [4, 6]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text())["runs"] for name in ("single", "ranks")]
    for runs in summaries:  # tok/s is the one wall-time figure
        for run in runs:
            run.pop("tokens_per_second")
    assert summaries[0] == summaries[1] and summaries[1][1]["prompts"] == 5


def test_bad_distributed_input_is_one_line_and_exit_2(tiny, tmp_path, monkeypatch):
    from kvreviver_cli.app import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny), "--methods", "full"])
    assert result.exit_code == 2 and "--out is needed" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("WORLD_SIZE", "two")
    result = CliRunner().invoke(app, ["niah", "--model", str(tiny), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "WORLD_SIZE must be an integer" in result.output
    assert not list(tmp_path.iterdir())
