"""Statistics, Holm's correction and the verdict rules against arithmetic worked out by hand;
reproduce end to end on a tiny grid."""

import math

import pytest

from backforward.experiments.report import (
    EQUIVALENT,
    FAILS,
    HIGHER,
    HOLDS,
    LOWER,
    MEASURES,
    RULES,
    SIMILAR,
    SMALL,
    TOY_SHARE,
    TOY_SIGN,
    TRAIN_LOSS,
    UNSURE,
    VAL_ACC,
    VERDICTS,
    Claim,
    Evidence,
    claims_table,
    compare,
    compare_shares,
    compare_signs,
    decide,
    holm,
    mcnemar,
    mean_ci,
    paired_t,
    sign_test,
    spearman,
    verdict,
)
from backforward.experiments.reproduce import ReproduceConfig, reproduce
from backforward.experiments.toy import ToyConfig


def normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def t2_cdf(t: float) -> float:
    """Student t with 2 degrees of freedom has a closed-form CDF: 1/2 + t / (2 sqrt(t^2 + 2))."""
    return 0.5 + t / (2 * math.sqrt(t * t + 2))


def test_mean_ci_by_hand():
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3) = 2.484138
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert (lo, hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert math.isnan(mean_ci([5.0])[1])


def test_paired_t_by_hand():
    # d = 0.5, 0.1, 0.5: mean 0.366667, sd 0.230940, se 0.133333, t = 2.75 on 2 degrees of freedom.
    e = paired_t([1.0, 2.0, 3.0], [1.5, 2.1, 3.5], margin=0.5)
    assert e.estimate == pytest.approx(0.366667, abs=1e-6) and e.n == 3
    assert e.p == pytest.approx(2 * (1 - t2_cdf(2.75)), abs=1e-9)  # 0.110703
    assert (e.lo, e.hi) == pytest.approx((0.366667 - 4.302653 * 0.133333, 0.366667 + 4.302653 * 0.133333), abs=1e-5)
    # TOST against ±0.5: t = (0.366667 + 0.5) / 0.133333 = 6.5 and (0.366667 - 0.5) / 0.133333 = -1.
    assert e.p_equiv == pytest.approx(max(1 - t2_cdf(6.5), t2_cdf(-1.0)), abs=1e-9)  # 0.211325


def test_paired_t_without_spread():
    # The case: the same accuracy in both arms in every seed is evidence of no effect.
    same = paired_t([0.9] * 5, [0.9] * 5, margin=0.005)
    assert (same.estimate, same.p, same.p_equiv) == (0.0, 1.0, 0.0)
    shifted = paired_t([0.9] * 5, [0.91] * 5, margin=0.005)
    assert shifted.p == 0.0 and shifted.p_equiv == 1.0
    assert math.isnan(paired_t([1.0], [2.0], 0.1).p)
    # A pair with a NaN (a diverged run) is left out.
    assert paired_t([1.0, 2.0, math.nan, 3.0], [1.5, 2.1, 9.0, 3.5], 0.5).n == 3


def test_mcnemar_by_hand():
    # 10 seeds: B alone succeeds in 6, A alone in 1, both in 2, neither in 1.
    a = [False] * 6 + [True] + [True] * 2 + [False]
    b = [True] * 6 + [False] + [True] * 2 + [False]
    e = mcnemar(a, b, margin=0.1)
    assert e.estimate == 0.5
    assert e.p == pytest.approx(2 * (7 + 1) / 2 ** 7)  # exact binomial on 7 discordant seeds, 6 of them B's
    # Agresti-Min: cells + 1/2, n = 12, centre 5/12, se = sqrt(6.5 + 1.5 - 5^2/12) / 12 = 0.202702.
    centre, se = 5 / 12, math.sqrt(8 - 25 / 12) / 12
    assert (e.lo, e.hi) == pytest.approx((centre - 1.959964 * se, centre + 1.959964 * se), abs=1e-6)
    assert e.p_equiv == pytest.approx(max(normal_sf((centre + 0.1) / se), 1 - normal_sf((centre - 0.1) / se)))
    # No discordant seed: p = 1, and the interval still has a width.
    none = mcnemar([True, False, False], [True, False, False], 0.1)
    assert none.p == 1.0 and none.hi > none.lo


def test_sign_test_by_hand():
    # B below A in 8 seeds, above in 1, one tie: 9 non-tied; P(X >= 8 | 9, 1/2) = 10/512, doubled.
    a = [1.0] * 10
    b = [0.5] * 8 + [2.0] + [1.0]
    e = sign_test([-x for x in a], [-y for y in b], margin=0.1)  # oriented: "B lower" counts as B above A
    assert e.n == 9 and e.estimate == pytest.approx(8 / 9 - 0.5)
    assert e.p == pytest.approx(20 / 512)
    # Clopper-Pearson for 8 of 9: the upper end solves x^9 = 0.975; the lower end 9x^8 - 8x^9 = 0.025.
    lo, hi = e.lo + 0.5, e.hi + 0.5
    assert hi == pytest.approx(0.975 ** (1 / 9), abs=1e-6)
    assert 9 * lo ** 8 - 8 * lo ** 9 == pytest.approx(0.025, abs=1e-6)
    # TOST against 1/2 ± 0.1: P(X >= 8 | 0.4) = 9·0.4^8·0.6 + 0.4^9; P(X <= 8 | 0.6) = 1 - 0.6^9.
    assert e.p_equiv == pytest.approx(max(9 * 0.4 ** 8 * 0.6 + 0.4 ** 9, 1 - 0.6 ** 9))
    claim = compare_signs("c", TOY_SIGN, a, b, LOWER)
    assert claim.b == "lower in 8 of 9 non-tied seeds" and claim.evidence.estimate > 0


def test_spearman_by_hand():
    # Ranks differ by -1, 1, -1, 1, 0: rho = 1 - 6·4 / (5·24) = 0.8; t = 0.8 sqrt(3 / 0.36) on 3 df.
    e = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], margin=0.3)
    assert e.estimate == pytest.approx(0.8)
    t = 0.8 * math.sqrt(3 / 0.36)
    cdf3 = 0.5 + ((t / math.sqrt(3)) / (1 + t * t / 3) + math.atan(t / math.sqrt(3))) / math.pi
    assert e.p == pytest.approx(2 * (1 - cdf3), abs=1e-9)
    se = math.sqrt((1 + 0.8 ** 2 / 2) / 2)  # Bonett-Wright
    z = math.atanh(0.8)
    assert (e.lo, e.hi) == pytest.approx((math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)), abs=1e-6)
    assert math.isnan(spearman([1, 2, 3], [1, 2, 3], 0.3).p)  # too few arms


def test_holm_by_hand():
    # sorted 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> kept monotone at 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.02, 0.001, math.nan])  # the NaN is not a test: a family of 2
    assert adjusted[:2] == pytest.approx([0.02, 0.002]) and math.isnan(adjusted[2])
    assert holm([0.5, 0.6]) == [1.0, 1.0]


@pytest.mark.parametrize("estimate, p, p_equiv, direction, expected", [
    (-0.02, 0.001, 0.9, LOWER, HOLDS),
    (-0.005, 0.001, 0.01, LOWER, SMALL),      # significant but below m: not "equivalent"
    (0.02, 0.001, 0.9, LOWER, FAILS),
    (0.001, 0.5, 0.01, LOWER, EQUIVALENT),
    (0.001, 0.5, 0.2, LOWER, UNSURE),
    (0.02, 0.001, 0.9, HIGHER, HOLDS),
    (0.0, 0.8, 0.01, SIMILAR, EQUIVALENT),
    (0.02, 0.001, 0.9, SIMILAR, FAILS),
    (0.005, 0.001, 0.3, SIMILAR, UNSURE),     # a significant difference below m, not shown equivalent
    (math.nan, math.nan, math.nan, LOWER, UNSURE),
])
def test_verdict_rules(estimate, p, p_equiv, direction, expected):
    evidence = Evidence(estimate, estimate - 0.001, estimate + 0.001, p, p_equiv, 5)
    assert verdict(evidence, direction, 0.01, p, p_equiv) == expected


def _claim(p: float) -> Claim:
    return Claim("c", TRAIN_LOSS, "", "", Evidence(-0.5, -0.6, -0.4, p, 1.0, 5), LOWER, 1.0, 5, 5)


def test_holm_decides_and_flags_flipped_verdicts():
    claims = decide([_claim(0.02), _claim(0.03), _claim(0.2)])  # adjusted: 0.06, 0.06, 0.2
    assert [c.verdict for c in claims] == [UNSURE] * 3
    assert [c.unadjusted for c in claims] == [HOLDS, HOLDS, UNSURE]
    table = claims_table(claims)
    assert table.count("**inconclusive (holds before Holm)** |") == 2
    assert "0.02 → 0.06" in table
    assert [c.verdict for c in decide([_claim(0.02), _claim(0.03)])] == [HOLDS, HOLDS]  # 0.04, 0.04
    with pytest.raises(RuntimeError, match="decide"):
        claims_table([_claim(0.01)])


def test_compare_pairs_by_seed_and_reports_relative_effect():
    # The arms differ a lot between seeds but by exactly -0.01 within each: the pairing must see it.
    claim = decide([compare("c", TRAIN_LOSS, [0.5, 0.9, 0.1], [0.49, 0.89, 0.09], LOWER)])[0]
    assert claim.evidence.estimate == pytest.approx(-0.01) and claim.evidence.p < 1e-9
    assert claim.relative[0] == pytest.approx(-0.01 / 0.5 * 100)  # % of A's mean 0.5
    assert claim.minimum == pytest.approx(0.005)                  # 1% of A
    assert claim.verdict == HOLDS
    with pytest.raises(ValueError, match="pairs need both arms"):
        compare("c", TRAIN_LOSS, [0.5], [0.6, 0.7])
    diverged = compare("c", VAL_ACC, [0.9, 0.91, math.nan], [0.92, 0.93, 0.5])
    assert diverged.pairs == 2 and diverged.claim == "c (2 of 3 pairs complete)"


def test_toy_share_claim():
    claim = decide([compare_shares("c", TOY_SHARE, [False] * 90 + [True] * 10, [True] * 90 + [False] * 10)])[0]
    assert claim.a == "10% (10 of 100)" and claim.b == "90% (90 of 100)" and claim.verdict == HOLDS


def test_rules_declare_every_measure_and_verdict():
    for m in MEASURES:
        assert f"| {m.label} | {m.describe()} |" in RULES
    for v in VERDICTS:
        assert f"**{v}**" in RULES


def test_reproduce_writes_report_figures_and_computed_verdicts(tmp_path):
    cfg = ReproduceConfig(seeds=2, epochs=2, toy=ToyConfig(seeds=3), hidden=16)
    report = reproduce(tmp_path, jobs=2, cfg=cfg)
    text = report.read_text()
    for figure in ("fig1.png", "weight_norms.png", "lr_decay.png", "toy.png", "reproduce_effects.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"
        assert f"({figure})" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith("** |")]
    assert len(rows) == 23  # 5 toy arms x 2, similar, 2 lrs x 2, 3 lrs x 2 (norm, gap), 2 decay
    assert all(any(f"**{v}" in row for v in VERDICTS) for row in rows)
    assert len(list((tmp_path / "runs").iterdir())) == 2 * 4 * 2
    assert "Settings of the 16 runs read" in text and "epochs 2, batch_size 128, hidden 16" in text
    assert text.index("How verdicts are computed") < text.index("Minimum effects of interest") < text.index("| claim")
    assert text.index("Where this rerun deviates") < text.index("### Claims")
    assert "Family: the 23 verdict rows" in text


def test_diverged_runs_are_listed_and_untestable_rows_leave_the_family():
    from backforward.experiments.report import diverged_line, family_note

    finished, stopped = [{"epoch": 1}, {"epoch": 2}], [{"epoch": 1}]
    assert diverged_line({"SGD": [finished, finished], "Backforward": [stopped, finished]}, 2) == (
        "**Diverged** (runs stopped by a non-finite loss; their pairs are left out of the tests): Backforward: 1 of 2.")
    assert diverged_line({"SGD": [finished]}, 2) == ""
    untested = Claim("c", TRAIN_LOSS, "", "", paired_t([1.0, math.nan], [2.0, 3.0], 0.1), LOWER, 1.0, 1, 2)
    claims = decide([_claim(0.03), untested])  # a family of one: 0.03 stays 0.03
    assert claims[0].p_adjusted == pytest.approx(0.03) and claims[0].verdict == HOLDS
    assert claims[1].verdict == UNSURE
    assert "(1 that could not be tested left out)" in family_note(claims)


def test_count_verdicts():
    from backforward.experiments.report import count_verdicts

    claims = [Claim("c", TRAIN_LOSS, "", "", Evidence(0, 0, 0, 1, 1, 5), LOWER, 1.0, 5, 5, verdict=v)
              for v in (HOLDS, SMALL, SMALL, FAILS)]
    assert count_verdicts(claims) == "holds: 1; holds, below the minimum effect: 2; does not hold: 1"


def test_a_percentage_of_float_rounding_reads_0_and_others_keep_their_digits():
    from backforward.experiments.report import _pct

    assert [_pct(x) for x in (-7.7e-15, 3e-12, 0.0512, -3.14159, 12.6)] == ["0%", "0%", "+0.051%", "-3.1%", "+13%"]


def test_the_data_deviation_gives_its_reason_only_for_the_embedded_digits():
    from backforward.experiments.data import EMBEDDED_SOURCE
    from backforward.experiments.reproduce import QUICK, deviations

    assert "no dataset host is reachable here" in deviations(QUICK, EMBEDDED_SOURCE)
    full = deviations(QUICK, "IDX files in /data/mnist")
    assert "no dataset host" not in full
    assert "| IDX files in /data/mnist | none: `--data-dir` gave these files |" in full
