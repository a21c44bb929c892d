"""Statistics, verdicts, figures and the markdown report, shared by ``reproduce`` and the studies.

Every verdict is computed here from measured numbers by the rules in ``RULES``, which the
report prints before its first table, with the minimum effect of interest of every measure
(``MEASURES``). A section builds its claims, calls ``decide`` once on all of them (its
family, for Holm's correction), and only then renders tables and computed sentences.
Nothing in a report is typed by hand.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from .files import atomic_write_bytes, atomic_write_text

ALPHA = 0.05
HOLDS = "holds"
SMALL = "holds, below the minimum effect"
EQUIVALENT = "equivalent"
UNSURE = "inconclusive"
FAILS = "does not hold"
VERDICTS = (HOLDS, SMALL, EQUIVALENT, UNSURE, FAILS)
HIGHER, LOWER, SIMILAR = 1, -1, 0  # what a claim says about B against A
CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over 10 classes


# ---- measures and their minimum effects of interest ----

@dataclass(frozen=True)
class Measure:
    """A compared quantity and its minimum effect of interest: ``minimum`` of |A| if ``relative``, else absolute."""

    label: str
    minimum: float
    relative: bool
    why: str
    symbol: str = "B − A"  # what the estimate is called in a sentence
    scale_free: bool = False  # already a ratio (of a loss, over seeds): no "% of A" beside it

    def threshold(self, a_mean: float) -> float:
        return self.minimum * abs(a_mean) if self.relative else self.minimum

    def describe(self) -> str:
        return f"{self.minimum:.0%} of A" if self.relative else f"{self.minimum:g}"


_COST = ("a Backforward step costs 1.5× (one hidden layer) to about 6× (16) a plain step by the cost model; "
         "a gain below 1% of the loss does not pay for that, however small its p-value")
_ACC = ("half a percentage point: below the standard error of one accuracy measured on 1,000 validation "
        "digits (√(0.95·0.05/1000) ≈ 0.7 points)")
_ICS = "ICS varies several-fold between layers, epochs and depths; a change below a tenth of it explains nothing"
TRAIN_LOSS = Measure("mean training loss over epochs", 0.01, True, _COST)
FINAL_LOSS = Measure("final training loss", 0.01, True, _COST)
VAL_ACC = Measure("final validation accuracy", 0.005, False, _ACC)
GAP = Measure("generalisation gap (training − validation accuracy, final epoch)", 0.005, False,
              "the same half point as for accuracy")
WEIGHT_NORM = Measure("final weight L2 norm", 0.01, True,
                      "the paper reads a larger norm as ICS regularising; a change below 1% of the norm is far "
                      "below what explicit regularisers (weight decay) are used for")
ICS_SHIFT = Measure("‖G − G'‖/‖G‖, Linear stages 2..n", 0.1, True, _ICS)
ICS_ANGLE = Measure("1 − cos∠(G, G'), Linear stages 2..n", 0.1, True, _ICS)
ADVANTAGE = Measure("Backforward's advantage: (SGD − Backforward) / SGD mean training loss", 0.01, False,
                    "one percentage point, the training loss's own minimum effect", scale_free=True)
FLOP_LOSS = Measure("training loss at the same FLOP budget", 0.01, True, _COST)
SECOND_LOSS = Measure("training loss at the same second budget", 0.01, True, _COST)
TOY_SHARE = Measure("share of seeds with loss ≈ 0 after the step", 0.10, False,
                    "the paper's claim is all or nothing (≈ 0 for Backforward, 'very large' for SGD); 10 seeds in "
                    "100 is the least that could support it")
TOY_SIGN = Measure("share of seeds where B's loss after the step is lower, minus ½", 0.10, False,
                   "a loss lower in at most 60% of seeds is too close to a coin toss to say one method learns "
                   "the batch better", "share − ½")
CORRELATION = Measure("Spearman ρ over arms", 0.3, False, "Cohen's 'medium' correlation; a weaker link predicts little",
                      "ρ")
MEASURES = (TRAIN_LOSS, FINAL_LOSS, VAL_ACC, GAP, WEIGHT_NORM, ICS_SHIFT, ICS_ANGLE, ADVANTAGE, FLOP_LOSS,
            SECOND_LOSS, TOY_SHARE, TOY_SIGN, CORRELATION)


def _rules() -> str:
    rows = "\n".join(f"| {m.label} | {m.describe()} | {m.why} |" for m in MEASURES)
    return f"""\
**How verdicts are computed** (fixed before any run; every table applies these rules).

Arms of a comparison share their seeds (a seed fixes the initial weights and the batch order),
so each comparison is paired seed by seed.
- *Test of a difference* (two-sided, α = {ALPHA:g}): the paired t-test on B − A for a measured value;
  McNemar's exact test (a binomial test on the discordant seeds) for "reaches loss ≈ 0"; the sign test
  for "whose loss is lower"; Spearman's ρ for a correlation over arms. The B − A column gives the
  estimate and its 95% confidence interval (Student t; Wald for a difference of shares; Clopper–Pearson
  for the sign test's share; Fisher z for ρ); "% of A" puts it relative to A's mean.
- *Equivalence*: two one-sided tests (TOST) against ± the minimum effect of interest m.
- *Multiple comparisons*: a family is the set of verdict rows of one report section (a `##`
  heading). Holm's step-down correction adjusts the p-values of the difference tests, and
  separately those of the equivalence tests, within the family. The p column shows raw → adjusted
  (the equivalence test's, marked "eq.", where it decides); a verdict the correction changed
  says what it was before.
- *Verdict* for a claim that B is better than A (in the claimed direction):
  **{HOLDS}**: the difference is significant after correction on the claimed side, and its point
  estimate is at least m; **{SMALL}**: significant on the claimed side, point estimate below m;
  **{FAILS}**: significant on the other side; **{EQUIVALENT}**: no significant difference, and
  equivalence within ±m is shown (evidence of no effect that matters); **{UNSURE}**: none of these.
  For a claim that A and B are *similar*: **{EQUIVALENT}** (the claim holds) if equivalence within ±m
  is shown; **{FAILS}** if the difference is significant and its point estimate at least m;
  **{UNSURE}** otherwise.
- Settings where neither method trained (final training loss above 99% of ln 10, a uniform guess)
  say nothing about these claims: they are listed, not tested, and not part of a family. A run that
  diverged (a non-finite loss) leaves its seed's pair out (as does, in the cost study, a run with no
  epoch within the shared budget); the claim then says how many pairs are complete,
  the section lists every diverged run, and a test left with fewer than 2 pairs is *inconclusive* and
  not counted in the family.
- A sentence marked "computed" is put together from the verdicts beside it and says no more.

Minimum effects of interest (m), declared per measure before any run:

| measure | m | why |
|---|---|---|
{rows}
"""


RULES = _rules()


# ---- tests ----

@dataclass(frozen=True)
class Evidence:
    """What a test found: B − A (or ρ), its 95% CI, the p-value of "no difference", the TOST p against ±m."""

    estimate: float
    lo: float
    hi: float
    p: float
    p_equiv: float
    n: int


NO_EVIDENCE = Evidence(math.nan, math.nan, math.nan, math.nan, math.nan, 0)


def paired_t(a: Sequence[float], b: Sequence[float], margin: float) -> Evidence:
    """Paired t-test of B − A over the pairs where both are finite; TOST against ±margin."""
    d = np.array([y - x for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)], dtype=float)
    if len(d) < 2:
        return Evidence(float(d.mean()) if len(d) else math.nan, math.nan, math.nan, math.nan, math.nan, len(d))
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:  # every pair differs by the same amount: no spread to test against
        return Evidence(mean, mean, mean, 1.0 if mean == 0 else 0.0, 0.0 if abs(mean) < margin else 1.0, len(d))
    result = stats.ttest_1samp(d, 0.0)
    ci = result.confidence_interval(1 - ALPHA)
    p_lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    p_upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return Evidence(mean, float(ci.low), float(ci.high), float(result.pvalue), float(max(p_lower, p_upper)), len(d))


def mcnemar(a: Sequence[bool], b: Sequence[bool], margin: float) -> Evidence:
    """Paired shares of success, B − A: McNemar's exact test (binomial on the discordant seeds); the CI and
    the TOST use Agresti & Min's (2005) adjusted Wald, ½ added to each cell of the 2×2 table, which does
    not collapse to a point when no seed is discordant."""
    n = len(a)
    if n != len(b) or n == 0:
        raise ValueError("McNemar's test needs the same seeds, at least one, in both arms")
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    discordant = b_only + a_only
    p = stats.binomtest(b_only, discordant, 0.5).pvalue if discordant else 1.0
    n_adj, b_adj, a_adj = n + 2, b_only + 0.5, a_only + 0.5
    centre = (b_adj - a_adj) / n_adj
    se = math.sqrt(b_adj + a_adj - (b_adj - a_adj) ** 2 / n_adj) / n_adj
    half = stats.norm.ppf(1 - ALPHA / 2) * se
    p_equiv = max(stats.norm.sf((centre + margin) / se), stats.norm.cdf((centre - margin) / se))
    return Evidence((b_only - a_only) / n, centre - half, centre + half, float(p), float(p_equiv), n)


def sign_test(a: Sequence[float], b: Sequence[float], margin: float) -> Evidence:
    """Share of non-tied pairs with B > A, minus ½: exact binomial test, Clopper–Pearson CI, TOST."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    n = len(pairs)
    if n == 0:
        return Evidence(0.0, math.nan, math.nan, 1.0, math.nan, 0)
    k = sum(1 for x, y in pairs if y > x)
    result = stats.binomtest(k, n, 0.5)
    ci = result.proportion_ci(1 - ALPHA)
    p_equiv = max(stats.binomtest(k, n, 0.5 - margin, alternative="greater").pvalue,
                  stats.binomtest(k, n, 0.5 + margin, alternative="less").pvalue)
    return Evidence(k / n - 0.5, ci.low - 0.5, ci.high - 0.5, float(result.pvalue), float(p_equiv), n)


def spearman(x: Sequence[float], y: Sequence[float], margin: float) -> Evidence:
    """Spearman's ρ, its p-value, a Fisher-z CI (Bonett & Wright's variance) and TOST on the z scale."""
    pairs = [(u, v) for u, v in zip(x, y, strict=True) if math.isfinite(u) and math.isfinite(v)]
    n = len(pairs)
    if n < 4:
        return Evidence(math.nan, math.nan, math.nan, math.nan, math.nan, n)
    result = stats.spearmanr([u for u, _ in pairs], [v for _, v in pairs])
    rho = float(result.statistic)
    if abs(rho) >= 1:
        return Evidence(rho, rho, rho, float(result.pvalue), 0.0 if abs(rho) < margin else 1.0, n)
    se = math.sqrt((1 + rho ** 2 / 2) / (n - 3))
    z, half = math.atanh(rho), stats.norm.ppf(1 - ALPHA / 2) * se
    p_equiv = max(stats.norm.sf((z - math.atanh(-margin)) / se), stats.norm.cdf((z - math.atanh(margin)) / se))
    return Evidence(rho, math.tanh(z - half), math.tanh(z + half), float(result.pvalue), float(p_equiv), n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values. A NaN (a test that could not be run) stays NaN and does not
    count in the family's size."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(evidence: Evidence, direction: int, minimum: float, p: float, p_equiv: float) -> str:
    """The rule of ``RULES`` for one row, given (adjusted) p-values."""
    significant = p < ALPHA  # False for NaN
    equivalent = p_equiv < ALPHA
    if direction == SIMILAR:
        if equivalent:
            return EQUIVALENT
        return FAILS if significant and abs(evidence.estimate) >= minimum else UNSURE
    signed = evidence.estimate * direction
    if significant and signed > 0:
        return HOLDS if signed >= minimum else SMALL
    if significant and signed < 0:
        return FAILS
    return EQUIVALENT if equivalent else UNSURE


# ---- claims ----

@dataclass
class Claim:
    """One verdict row: the claim, its measure, both arms in words, the evidence; the verdict after ``decide``."""

    claim: str
    measure: Measure
    a: str
    b: str
    evidence: Evidence
    direction: int
    a_mean: float
    pairs: int
    planned: int
    p_adjusted: float = math.nan
    p_equiv_adjusted: float = math.nan
    verdict: str | None = None
    unadjusted: str | None = None

    @property
    def minimum(self) -> float:
        return self.measure.threshold(self.a_mean)

    @property
    def relative(self) -> tuple[float, float, float]:
        """B − A and its CI as % of |A's mean| (NaN where A has no mean)."""
        scale = abs(self.a_mean)
        if not scale or math.isnan(scale) or self.measure.scale_free:
            return math.nan, math.nan, math.nan
        e = self.evidence
        return 100 * e.estimate / scale, 100 * e.lo / scale, 100 * e.hi / scale

    def said(self) -> str:
        """The claim and its verdict in words, with the effect relative to A where there is one."""
        pct = self.relative[0]
        estimate = f"{self.measure.symbol} = {_num(self.evidence.estimate, 2)}"
        size = f"{_pct(pct)} of A" if math.isfinite(pct) else estimate
        return f"{self.claim}: {self.verdict} ({size})"


def _label(claim: str, pairs: int, planned: int) -> str:
    return claim if pairs == planned else f"{claim} ({pairs} of {planned} pairs complete)"


def compare(claim: str, measure: Measure, a: Sequence[float], b: Sequence[float],
            direction: int = HIGHER) -> Claim:
    """Paired comparison of arm B against arm A by seed (the lists in seed order): paired t-test."""
    if len(a) != len(b):
        raise ValueError(f"{claim}: {len(a)} runs against {len(b)}; pairs need both arms of every seed")
    a_stats = mean_ci(a)
    evidence = paired_t(a, b, measure.threshold(a_stats[0]))
    return Claim(_label(claim, evidence.n, len(a)), measure, fmt_ci(a_stats), fmt_ci(mean_ci(b)), evidence,
                 direction, a_stats[0], evidence.n, len(a))


def compare_shares(claim: str, measure: Measure, a: Sequence[bool], b: Sequence[bool]) -> Claim:
    """B succeeds more often than A, seed by seed: McNemar's test."""
    share_a, share_b = float(np.mean(a)), float(np.mean(b))
    evidence = mcnemar(a, b, measure.minimum)
    return Claim(claim, measure, f"{share_a:.0%} ({sum(a)} of {len(a)})", f"{share_b:.0%} ({sum(b)} of {len(b)})",
                 evidence, HIGHER, share_a, len(a), len(a))


def compare_signs(claim: str, measure: Measure, a: Sequence[float], b: Sequence[float],
                  direction: int = LOWER) -> Claim:
    """B's value is lower (or higher) than A's in most seeds: the sign test, on the share of seeds where
    B is on the claimed side (so its estimate is that share minus ½, and the claim is that it is positive)."""
    evidence = sign_test([direction * x for x in a], [direction * y for y in b], measure.minimum)
    wins = sum(1 for x, y in zip(a, b, strict=True) if (y - x) * direction > 0)
    side = "lower" if direction == LOWER else "higher"
    return Claim(claim, measure, "", f"{side} in {wins} of {evidence.n} non-tied seeds", evidence, HIGHER,
                 math.nan, len(a), len(a))


def converges_faster(claim: str, a: Sequence[Sequence[dict]], b: Sequence[Sequence[dict]], epochs: int) -> Claim:
    """B's mean training loss over epochs is lower than A's (runs in seed order)."""
    return compare(claim, TRAIN_LOSS, area(a, "train_loss", epochs), area(b, "train_loss", epochs), LOWER)


def performs_better(claim: str, a: Sequence[Sequence[dict]], b: Sequence[Sequence[dict]], epochs: int) -> Claim:
    """B's final validation accuracy is higher than A's (runs in seed order)."""
    return compare(claim, VAL_ACC, final(a, "val_acc", epochs), final(b, "val_acc", epochs), HIGHER)


def correlate(claim: str, measure: Measure, x: Sequence[float], y: Sequence[float], x_label: str,
              y_label: str) -> Claim:
    """Spearman's ρ of y on x over arms; the claim is a positive correlation."""
    evidence = spearman(x, y, measure.minimum)
    return Claim(claim, measure, x_label, y_label, evidence, HIGHER, math.nan, evidence.n, evidence.n)


def decide(claims: Sequence[Claim]) -> list[Claim]:
    """Holm's correction over ``claims`` (one family), then every verdict, adjusted and unadjusted."""
    p_adj = holm([c.evidence.p for c in claims])
    p_eq_adj = holm([c.evidence.p_equiv for c in claims])
    for c, p, q in zip(claims, p_adj, p_eq_adj, strict=True):
        c.p_adjusted, c.p_equiv_adjusted = p, q
        c.verdict = verdict(c.evidence, c.direction, c.minimum, p, q)
        c.unadjusted = verdict(c.evidence, c.direction, c.minimum, c.evidence.p, c.evidence.p_equiv)
    return list(claims)


# ---- formatting ----

def _num(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}g}"


def _pct(x: float) -> str:
    """A signed percentage, two significant digits below 10%, whole numbers above; 0 for a difference of float
    rounding (arms equal but for the order of a sum), not "-7.7e-15%"."""
    if abs(x) < 1e-9:
        return "0%"
    return f"{x:+.0f}%" if abs(x) >= 10 else f"{x:+.2g}%"


def _p(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return "<0.0001" if x < 1e-4 else f"{x:.2g}"


def fmt_ci(ci: tuple[float, float, float], digits: int = 4) -> str:
    mean, lo, hi = ci
    if math.isnan(mean):
        return "n/a"
    if math.isnan(lo):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of its Student-t confidence interval (NaN ends for fewer than 2 values)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def verdict_cell(c: Claim) -> str:
    if c.verdict is None:
        raise RuntimeError(f"{c.claim}: no verdict yet; call decide() on the section's claims first")
    flipped = f" ({c.unadjusted} before Holm)" if c.unadjusted != c.verdict else ""
    return f"**{c.verdict}{flipped}**"


def claim_row(c: Claim) -> str:
    e = c.evidence
    difference = fmt_ci((e.estimate, e.lo, e.hi))
    pct, lo, hi = c.relative
    relative = "" if math.isnan(pct) else _pct(pct) + ("" if math.isnan(lo) else f" [{_pct(lo)}, {_pct(hi)}]")
    if c.measure.scale_free:
        relative = "(a ratio already)"
    if c.verdict == EQUIVALENT:
        p = f"eq. {_p(e.p_equiv)} → {_p(c.p_equiv_adjusted)}"
    else:
        p = f"{_p(e.p)} → {_p(c.p_adjusted)}"
    minimum = f"±{c.minimum:.2g}"
    return (f"| {c.claim} | {c.measure.label} | {c.a} | {c.b} | {difference} | {relative} | {minimum} | {p} "
            f"| {verdict_cell(c)} |")


def claims_table(claims: Sequence[Claim], a_label: str = "SGD", b_label: str = "Backforward") -> str:
    a_head, b_head = (label if label in "AB" else f"{label} ({arm})" for label, arm in ((a_label, "A"), (b_label, "B")))
    rows = [f"| claim | measure | {a_head} | {b_head} | B − A [95% CI] | % of A [95% CI] | min. effect "
            "| p → Holm | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(rows + [claim_row(c) for c in claims])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def count_verdicts(claims: Sequence[Claim]) -> str:
    """"holds: 3; holds, below the minimum effect: 1; ..." over the given claims, in the order of VERDICTS."""
    counts = {v: sum(1 for c in claims if c.verdict == v) for v in VERDICTS}
    return "; ".join(f"{v}: {n}" for v, n in counts.items() if n) or "no verdicts"


def family_note(claims: Sequence[Claim]) -> str:
    flipped = sum(1 for c in claims if c.unadjusted != c.verdict)
    untested = sum(1 for c in claims if math.isnan(c.evidence.p))
    left = f" ({untested} that could not be tested left out)" if untested else ""
    return (f"Family: the {len(claims)} verdict rows of this section{left} (Holm); {flipped} verdict(s) changed by "
            "the correction." if claims else "")


def diverged_line(named: dict[str, Sequence[Sequence[dict]]], epochs: int) -> str:
    """Which arms had runs stop on a non-finite loss, and how many; empty if none did."""
    stopped = [f"{label}: {n} of {len(runs)}" for label, runs in named.items()
               if (n := sum(1 for r in runs if len(r) < epochs))]
    return ("**Diverged** (runs stopped by a non-finite loss; their pairs are left out of the tests): "
            + "; ".join(stopped) + ".") if stopped else ""


# ---- figures ----

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def band(ax, runs: Sequence[Sequence[dict]], key, label: str, color: str, x_key: str = "epoch",
         style: str = "-") -> None:
    """Mean curve over seeds with a 95% CI band; runs may have different lengths (diverged ones stop).

    ``key`` is a metrics key or a function of one epoch's record.
    """
    value = key if callable(key) else (lambda m: m[key])
    length = max((len(r) for r in runs), default=0)
    xs, means, los, his = [], [], [], []
    for i in range(length):
        values = [value(r[i]) for r in runs if len(r) > i]
        x = [r[i][x_key] for r in runs if len(r) > i]
        mean, lo, hi = mean_ci(values)
        xs.append(float(np.mean(x)))
        means.append(mean)
        los.append(lo if not math.isnan(lo) else mean)
        his.append(hi if not math.isnan(hi) else mean)
    ax.plot(xs, means, style, color=color, label=label)
    ax.fill_between(xs, los, his, color=color, alpha=0.2, linewidth=0)


def curves_figure(path: Path, panels: Sequence[tuple[str, dict[str, Sequence[Sequence[dict]]]]],
                  rows: Sequence[tuple[object, str, bool]], x_key: str = "epoch", x_label: str = "epoch") -> None:
    """A grid: one column per panel (title, {label: runs}), one row per (metric key, axis label, log scale)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.2 * len(rows)), squeeze=False)
    for col, (title, arms) in enumerate(panels):
        for row, (key, label, log) in enumerate(rows):
            ax = axes[row][col]
            for i, (arm, runs) in enumerate(arms.items()):
                band(ax, runs, key, arm, f"C{i}", x_key=x_key)
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            if row == 0:
                ax.set_title(title)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


VERDICT_COLORS = {HOLDS: "tab:green", SMALL: "yellowgreen", EQUIVALENT: "tab:blue", UNSURE: "tab:gray",
                  FAILS: "tab:red"}


def forest_figure(claims: Sequence[Claim], path: Path, title: str) -> None:
    """Each claim's B − A with its 95% CI in units of its minimum effect m, signed so that the claimed
    direction points right (similarity claims: as measured); the grey band is ±m."""
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter

    fig, ax = plt.subplots(figsize=(11, 1.3 + 0.3 * len(claims)))
    for i, c in enumerate(reversed(claims)):
        e, m = c.evidence, c.minimum
        sign = c.direction or 1
        if not (m > 0 and math.isfinite(e.estimate)):
            continue
        points = [sign * v / m for v in (e.estimate, e.lo, e.hi)]
        color = VERDICT_COLORS[c.verdict]
        if math.isfinite(points[1]):
            ax.plot([min(points[1:]), max(points[1:])], [i, i], color=color, linewidth=2)
        ax.plot(points[0], i, "o", color=color)
    ax.axvspan(-1, 1, color="0.9", zorder=0)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(claims)), [_short(c.claim) for c in reversed(claims)], fontsize=7)
    ax.set_ylim(-0.7, len(claims) - 0.3)
    ax.set_xscale("symlog", linthresh=1)
    ticks = [-1000, -100, -20, -5, -2, -1, 0, 1, 2, 5, 20, 100, 1000]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("B − A in units of the minimum effect m; the claimed direction to the right; grey: ±m")
    ax.set_title(title, fontsize=9)
    handles = [plt.Line2D([], [], color=color, marker="o", linestyle="-", label=v) for v, color in
               VERDICT_COLORS.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.02 + 0.3 / len(claims)),
              ncol=len(handles), frameon=False)
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)


def _short(text: str, width: int = 84) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ---- the report file ----

SECTION_ORDER = ("reproduce", "lr-control", "depth", "batchnorm", "order", "arch", "optimizer", "warmup", "cost")


def write_section(out: Path, name: str, text: str) -> Path:
    """Write one section, then rebuild REPORT.md from every section present, in a fixed order."""
    atomic_write_text(out / "sections" / f"{name}.md", text.rstrip() + "\n")
    return assemble_report(out)


def assemble_report(out: Path) -> Path:
    folder = out / "sections"
    present = [n for n in SECTION_ORDER if (folder / f"{n}.md").exists()]
    present += sorted(p.stem for p in folder.glob("*.md") if p.stem not in SECTION_ORDER)
    body = "\n\n".join((folder / f"{n}.md").read_text().rstrip() for n in present)
    text = ("# Backforward: report\n\nWritten by `backforward reproduce` and `backforward study`; every number, "
            "figure, verdict and sentence marked computed below is computed from the runs in `runs/`.\n\n"
            + RULES + "\n" + body + "\n")
    atomic_write_text(out / "REPORT.md", text)
    return out / "REPORT.md"


# ---- reading runs ----

def finished(run: Sequence[dict], epochs: int) -> bool:
    return len(run) >= epochs


def final(runs: Sequence[Sequence[dict]], key: str, epochs: int | None = None) -> list[float]:
    """The last epoch's value of ``key`` in each run; NaN for a run that stopped before ``epochs``."""
    return [r[-1][key] if r and (epochs is None or len(r) >= epochs) else math.nan for r in runs]


def area(runs: Sequence[Sequence[dict]], key: str, epochs: int | None = None) -> list[float]:
    """Mean of ``key`` over a run's epochs (lower for a loss that falls sooner); NaN for a run that stopped early."""
    return [float(np.mean([m[key] for m in r])) if r and (epochs is None or len(r) >= epochs) else math.nan
            for r in runs]


def training_seconds(runs: Sequence[Sequence[dict]]) -> float:
    return float(sum(r[-1]["train_seconds"] for r in runs if r))


# ---- publishing: docs/results and the README's excerpt ----

README_BEGIN = ("<!-- results: generated from docs/results/REPORT.md by "
                "`python -m backforward.experiments.report runs/report docs/results README.md`; do not edit -->")
README_END = "<!-- end of generated results -->"
README_TABLE_ROWS = 25  # sections with more verdict rows show their answer and figure here; the table is in the report
_COMMAND = re.compile(r"^Written by `(backforward [^`]+)`")
_COMPUTED = ("**Summary (computed", "**Answer (computed", "**Toy (computed", "**Not trained**")


def anchor(title: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def readme_results(report: str, folder: str = "docs/results") -> str:
    """The README's excerpt of REPORT.md: per section its command, its first paragraph, its verdict table
    (up to ``README_TABLE_ROWS`` rows), its computed sentences and its effects figure; all verbatim."""
    blocks = []
    for section in re.split(r"(?m)^## ", report)[1:]:
        title, _, body = section.partition("\n")
        paragraphs = [p.strip() for p in body.strip().split("\n\n")]
        command = _COMMAND.match(paragraphs[0]) if paragraphs else None
        if command is None:
            continue
        parts = [f"### {title}: `{command.group(1)}`", paragraphs[0]]
        table = next((p for p in paragraphs if p.startswith("| claim |")), "")
        rows = table.count("\n") - 1
        if table and rows <= README_TABLE_ROWS:
            parts.append(table)
        elif table:
            parts.append(f"Its {rows} verdict rows: [the report]({folder}/REPORT.md#{anchor(title)}).")
        parts += [p for p in paragraphs if p.startswith(("Family:", *_COMPUTED))]
        parts += [p.replace("](", f"]({folder}/") for p in paragraphs
                  if p.startswith("![") and p.endswith(("_effects.png)", "fig1.png)"))]
        blocks.append("\n\n".join(parts))
    return "\n\n".join([README_BEGIN, *blocks, README_END])


def replace_readme_results(readme: str, report: str) -> str:
    start, end = readme.index(README_BEGIN), readme.index(README_END) + len(README_END)
    return readme[:start] + readme_results(report) + readme[end:]


def publish(report_dir: Path, results_dir: Path, readme: Path) -> None:
    """Copy REPORT.md and its figures (not runs/) to ``results_dir``; rewrite the README's excerpt from it."""
    results_dir.mkdir(parents=True, exist_ok=True)
    report = (report_dir / "REPORT.md").read_text()
    for figure in sorted(report_dir.glob("*.png")):
        atomic_write_bytes(results_dir / figure.name, figure.read_bytes())
    atomic_write_text(results_dir / "REPORT.md", report)
    atomic_write_text(readme, replace_readme_results(readme.read_text(), report))


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4:
        sys.exit("usage: python -m backforward.experiments.report REPORT_DIR RESULTS_DIR README")
    publish(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
