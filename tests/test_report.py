"""Statistics and verdict rules against hand arithmetic; reproduce end to end on a tiny grid."""

import math

import pytest

from backforward.experiments.report import FAILS, HOLDS, UNSURE, better, compare, mean_ci, similar, toy_verdict
from backforward.experiments.reproduce import ReproduceConfig, reproduce


def test_mean_ci_by_hand():
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3) = 2.484138
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert (lo, hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert math.isnan(mean_ci([5.0])[1])


def test_verdict_rules():
    assert better((1.0, 0.5, 1.5)) == HOLDS
    assert better((-1.0, -1.5, -0.5)) == FAILS
    assert better((0.1, -0.5, 0.7)) == UNSURE
    assert better((-1.0, -1.5, -0.5), higher_is_better=False) == HOLDS
    assert similar((0.0, -0.005, 0.008)) == HOLDS
    assert similar((0.05, 0.02, 0.08)) == FAILS
    assert similar((0.01, -0.005, 0.03)) == UNSURE
    assert toy_verdict(0.9, 0.1) == HOLDS
    assert toy_verdict(0.4, 0.1) == FAILS
    assert toy_verdict(0.6, 0.7) == FAILS
    assert toy_verdict(0.6, 0.3) == UNSURE


def test_compare_pairs_by_seed():
    # The arms differ a lot between seeds but by exactly +0.1 within each seed: the pairing must see it.
    claim = compare("c", "m", [0.5, 0.9, 0.1], [0.6, 1.0, 0.2])
    assert claim.verdict == HOLDS and claim.difference.startswith("0.1")
    with pytest.raises(ValueError, match="pairs need both arms"):
        compare("c", "m", [0.5], [0.6, 0.7])


def test_reproduce_writes_report_figures_and_computed_verdicts(tmp_path):
    cfg = ReproduceConfig(seeds=2, epochs=2, toy_seeds=2, hidden=16)
    report = reproduce(tmp_path, jobs=2, cfg=cfg)
    text = report.read_text()
    for figure in ("fig1.png", "weight_norms.png", "lr_decay.png", "toy.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"
        assert f"({figure})" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith("** |")]
    assert len(rows) == 11
    assert all(any(f"**{v}**" in row for v in (HOLDS, FAILS, UNSURE)) for row in rows)
    assert len(list((tmp_path / "runs").iterdir())) == 2 * 4 * 2
    assert "Settings of the 16 runs read" in text and "epochs 2, batch_size 128, hidden 16" in text
