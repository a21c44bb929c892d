"""Every study runs end to end on a tiny grid and writes its section with computed verdicts."""

import pytest

from backforward.experiments.report import FAILS, HOLDS, UNSURE
from backforward.experiments.studies import STUDIES, StudyConfig, at_budget, equal_budget, run_study

TINY = StudyConfig(seeds=2, epochs=2, lrs=(0.1,), depths=(1, 2), hidden=8, switch_epoch=1, finetune_epochs=1)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    for name in STUDIES:
        run_study(name, out, jobs=1, cfg=TINY)
    return out


@pytest.mark.parametrize("name", list(STUDIES))
def test_study_section_has_verdicts_and_figures(report_dir, name):
    text = (report_dir / "sections" / f"{name}.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith("** |")]
    assert rows and all(any(f"**{v}**" in row for v in (HOLDS, FAILS, UNSURE)) for row in rows)
    for figure in [part.split(")")[0] for part in text.split("](")[1:]]:
        assert (report_dir / figure).read_bytes()[:4] == b"\x89PNG"


def test_report_collects_every_section_in_order(report_dir):
    text = (report_dir / "REPORT.md").read_text()
    positions = [text.index(f"## Study: {title}") for title in ("depth", "BatchNorm", "warm-up", "update order",
                                                                 "cost")]
    assert positions == sorted(positions)


def test_order_study_answer_follows_its_verdicts(report_dir):
    text = (report_dir / "sections" / "order.md").read_text()
    assert "**Answer (from the verdicts above):**" in text


def test_fine_tuning_starts_from_the_sgd_model(report_dir):
    import json
    from pathlib import Path

    [folder] = (report_dir / "runs").glob("finetune-backforward-s0-*")
    [source] = (report_dir / "runs").glob("warm-sgd-s0-*")
    assert Path(json.loads((folder / "config.json").read_text())["init_from"]) == source.resolve()


def test_equal_budget_by_hand():
    sgd = [[{"flops": 10, "train_loss": 1.0}, {"flops": 20, "train_loss": 0.5}]]
    bf = [[{"flops": 15, "train_loss": 0.8}, {"flops": 30, "train_loss": 0.3}]]
    # budget = min(20, 30) = 20: SGD finished both epochs (0.5), Backforward only its first (0.8).
    assert equal_budget(sgd, bf, "flops") == ([0.5], [0.8])
    assert at_budget(bf[0], 14, "flops") != at_budget(bf[0], 14, "flops")  # nothing within budget: NaN


def test_depth_section_says_which_depths_did_not_train(report_dir):
    text = (report_dir / "sections" / "depth.md").read_text()
    assert ("Neither method trained" in text) != ("Every depth trained" in text)
