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


def test_readme_results_stand_verbatim_in_the_generated_files():
    readme = (ROOT / "README.md").read_text()
    results = readme[readme.index("## Results"):readme.index("## Layout")]
    report = (ROOT / "docs" / "results" / "REPORT.md").read_text()
    rows = [line for line in results.splitlines() if line.startswith("| ") and line.endswith("** |")]
    assert len(rows) > 20
    for line in rows + [line for line in results.splitlines() if line.startswith(("**Answer", "**Neither"))]:
        assert line in report, line
    blocks = re.findall(r"```\n(.*?)\n```", results, flags=re.S)
    assert blocks[0] == (ROOT / "docs" / "results" / "bench.txt").read_text().rstrip()
    assert blocks[1] == (ROOT / "docs" / "results" / "bench-distributed.txt").read_text().rstrip()
    for figure in re.findall(r"\]\((docs/results/[^)]+\.png)\)", results):
        assert (ROOT / figure).exists(), figure
