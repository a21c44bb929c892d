"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv .venv .*?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    main, tests = readme_commands()[:2]
    assert "pytest" in tests and "pytest" not in main
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


def test_readme_installs_with_the_torch_pin():
    for command in readme_commands()[:2]:
        assert "-c constraints.txt" in command
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
