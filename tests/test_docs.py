"""The README's commands are the ones CI runs; its results are the committed report's, verbatim."""

import re
from pathlib import Path

from backforward.experiments.report import README_BEGIN, README_END, VERDICTS, anchor, readme_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv .venv .*?)\n```", (ROOT / "README.md").read_text())


def results_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Results"):readme.index("## Layout")]


def test_ci_runs_the_readme_test_command():
    main, tests = readme_commands()[:2]
    assert "pytest" in tests and "pytest" not in main
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


def test_readme_installs_with_the_torch_pin():
    for command in readme_commands()[:2]:
        assert "-c constraints.txt" in command
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_readme_results_are_generated_from_the_committed_report():
    report = (RESULTS / "REPORT.md").read_text()
    results = results_section()
    generated = results[results.index(README_BEGIN):results.index(README_END) + len(README_END)]
    assert generated == readme_results(report), "rerun: python -m backforward.experiments.report ..."


def test_readme_results_stand_verbatim_in_the_generated_files():
    results = results_section()
    report = (RESULTS / "REPORT.md").read_text()
    rows = [line for line in results.splitlines() if line.startswith("| ") and line.endswith("** |")]
    assert len(rows) > 20
    computed = [line for line in results.splitlines() if line.startswith(("**Summary", "**Answer", "**Toy"))]
    assert len(computed) >= 9  # reproduce's summary and toy sentence, an answer per study
    for line in rows + computed:
        assert line in report, line
    blocks = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)\n```$", results, flags=re.S | re.M) if not lang]
    assert blocks[0] == (RESULTS / "bench.txt").read_text().rstrip()
    assert blocks[1] == (RESULTS / "bench-distributed.txt").read_text().rstrip()
    assert blocks[2] == (RESULTS / "bench-cuda.txt").read_text().rstrip()
    assert blocks[3] == (RESULTS / "bench-cuda-large.txt").read_text().rstrip()
    for figure in re.findall(r"\]\((docs/results/[^)#]+)", results):
        assert (ROOT / figure).exists(), figure


def test_every_conclusion_in_the_readme_sits_beside_its_verdicts():
    # A computed sentence names the verdicts it rests on: each carries at least one verdict word.
    for line in results_section().splitlines():
        if line.startswith(("**Summary", "**Answer", "**Toy")):
            assert any(v in line for v in VERDICTS), line


def test_no_stale_figures_in_docs_results():
    referenced = (RESULTS / "REPORT.md").read_text() + results_section()
    for figure in RESULTS.glob("*.png"):
        assert f"{figure.name})" in referenced, f"{figure.name} is in docs/results but nothing shows it"


def test_anchor_is_githubs():
    assert anchor("Study: is the gain a larger effective step?") == "study-is-the-gain-a-larger-effective-step"
    assert anchor("Reproducing the paper") == "reproducing-the-paper"
