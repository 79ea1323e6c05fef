"""benchmarks/ab_revisions.py: revisions archived for a side-by-side run, its table, and one-line errors (exit 2)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "ab_revisions.py"


def tool(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *arguments], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def load_tool():
    if str(TOOL.parent) not in sys.path:  # its sibling imports, as running the script finds them
        sys.path.insert(0, str(TOOL.parent))
    spec = importlib.util.spec_from_file_location("ab_revisions", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(repo: Path, *arguments: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *arguments], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with the three trees: ``main`` and a branch ``exp/faster`` that changes and deletes a file."""
    for tree in ("kvreviver_core", "kvreviver_cli", "benchmarks"):
        (tmp_path / tree).mkdir()
        (tmp_path / tree / "module.py").write_text(f"NAME = {tree!r}\n")
    (tmp_path / "kvreviver_core" / "old.py").write_text("GONE = 1\n")
    (tmp_path / "README.md").write_text("not archived\n")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "base")
    git(tmp_path, "checkout", "-q", "-b", "exp/faster")
    (tmp_path / "kvreviver_core" / "module.py").write_text("NAME = 'faster'\n")
    git(tmp_path, "rm", "-q", "kvreviver_core/old.py")
    git(tmp_path, "commit", "-q", "-am", "faster")
    git(tmp_path, "checkout", "-q", "main")
    return tmp_path


def test_prepare_archives_each_revisions_trees_and_lists_their_commits(repo):
    done = tool("prepare", "main", "exp/faster", cwd=repo)
    assert done.returncode == 0, done.stderr
    ab = repo / "runs" / "ab"
    listed = json.loads((ab / "revisions.json").read_text())
    assert [r["revision"] for r in listed] == ["main", "exp/faster"]
    assert [r["commit"] for r in listed] == [git(repo, "rev-parse", "main"), git(repo, "rev-parse", "exp/faster")]
    assert (ab / "main" / "kvreviver_core" / "module.py").read_text() == "NAME = 'kvreviver_core'\n"
    assert (ab / "exp__faster" / "kvreviver_core" / "module.py").read_text() == "NAME = 'faster'\n"
    assert (ab / "main" / "kvreviver_core" / "old.py").exists()
    assert not (ab / "exp__faster" / "kvreviver_core" / "old.py").exists()
    assert not (ab / "main" / "README.md").exists()
    # Prepared again under the same name at another commit: nothing of the earlier tree is left over.
    git(repo, "checkout", "-q", "exp/faster")
    git(repo, "branch", "-f", "main", "exp/faster")
    assert tool("prepare", "main", cwd=repo).returncode == 0
    assert not (ab / "main" / "kvreviver_core" / "old.py").exists()


def test_an_unknown_revision_or_a_run_without_prepare_is_a_one_line_error(repo):
    for arguments in (("prepare", "main", "no-such-branch"), ("run",), ("run", "--rounds", "0")):
        done = tool(*arguments, cwd=repo)
        assert done.returncode == 2, arguments
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("ab_revisions:")
    done = tool("run", "--contexts", "32k", cwd=repo)  # the parser's own error, as for the other benchmark scripts
    assert done.returncode == 2 and done.stderr == ("ab_revisions.py run: error: argument --contexts: expected "
                                                    "comma-separated integers, got '32k' (see --help)\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message off a GPU")
def test_run_off_a_gpu_says_so_in_one_line(repo):
    assert tool("prepare", "main", cwd=repo).returncode == 0
    done = tool("run", cwd=repo)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_table_divides_each_revision_by_the_full_cache_of_its_own_round():
    ab = load_tool()
    rows = [{"context": 32768, "round": 1, "revision": None, "commit": "", "tok_s": 100.0, "status": "ok"},
            {"context": 32768, "round": 1, "revision": "main", "commit": "a" * 40, "tok_s": 143.0, "status": "ok"},
            {"context": 32768, "round": 2, "revision": None, "commit": "", "tok_s": 110.0, "status": "ok"},
            {"context": 32768, "round": 2, "revision": "main", "commit": "a" * 40, "tok_s": 143.0, "status": "ok"},
            {"context": 32768, "round": 2, "revision": "exp/x", "commit": "b" * 40, "tok_s": None, "status": "oom"}]
    table = ab.summarize(rows).splitlines()
    assert table[3] == "| 32768 | 1 | main | aaaaaaa | 143.0 | 1.430 |"
    assert table[5] == "| 32768 | 2 | main | aaaaaaa | 143.0 | 1.300 |"
    assert table[6] == "| 32768 | 2 | exp/x | bbbbbbb | oom | n/a |"


def test_benchmark_1_lists_every_configuration_of_a_revision_with_the_defaults_first():
    ab = load_tool()
    lines = ab.attention_lines([{"revision": "exp/x", "commit": "c" * 40, "context": 32768, "knobs": "A/B",
                                 "sweep_us": {"4/1": 42.75, "4/2": 47.0}, "sdpa_full_us": 140.0}])
    assert lines == ["attention at 32768, exp/x (ccccccc), SDPA over the full cache 140.0 us; A/B:",
                     "  4/1: 42.8 us (defaults)", "  4/2: 47.0 us"]
