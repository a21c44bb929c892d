"""Statistics, verdicts, figures and the markdown report, shared by ``reproduce`` and the studies.

Every verdict is computed here from measured numbers by a rule stated in ``RULES``,
which the report prints beside its tables. Nothing in a report is typed by hand.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from .files import atomic_write_bytes, atomic_write_text

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
SIMILAR_MARGIN = 0.01  # "similar" validation accuracy: within ±1 percentage point

RULES = f"""\
**How verdicts are computed.** Runs of the two arms share a seed, so the seed fixes the
initial weights and the batch order of both: each comparison uses the paired difference
(arm B − arm A) per seed, its mean and its 95% confidence interval (Student's t over seeds).
- *B better than A*: **{HOLDS}** if the whole interval lies on the claimed side of 0;
  **{FAILS}** if the whole interval lies on the other side; **{UNSURE}** otherwise.
- *B similar to A*: **{HOLDS}** if the whole interval lies within ±{SIMILAR_MARGIN:g} (validation
  accuracy, i.e. ±{SIMILAR_MARGIN * 100:g} percentage point); **{FAILS}** if it lies wholly outside;
  **{UNSURE}** otherwise.
- *Toy experiment*: **{HOLDS}** if Backforward's loss after the step is below the tolerance in at
  least 80% of seeds and SGD's in at most 20%; **{FAILS}** if Backforward gets there in under
  half of the seeds, or no more often than SGD; **{UNSURE}** otherwise.
With few seeds the intervals are wide and *{UNSURE}* is the honest answer more often.
A verdict says whether a difference is there, not whether it matters: read its size in the
B − A column.
"""


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


def better(diff_ci: tuple[float, float, float], higher_is_better: bool = True) -> str:
    _, lo, hi = diff_ci
    if math.isnan(lo):
        return UNSURE
    if not higher_is_better:
        lo, hi = -hi, -lo
    return HOLDS if lo > 0 else FAILS if hi < 0 else UNSURE


def similar(diff_ci: tuple[float, float, float], margin: float = SIMILAR_MARGIN) -> str:
    _, lo, hi = diff_ci
    if math.isnan(lo):
        return UNSURE
    if -margin <= lo and hi <= margin:
        return HOLDS
    return FAILS if lo > margin or hi < -margin else UNSURE


def toy_verdict(bf_share: float, sgd_share: float) -> str:
    if bf_share >= 0.8 and sgd_share <= 0.2:
        return HOLDS
    if bf_share < 0.5 or bf_share <= sgd_share:
        return FAILS
    return UNSURE


def fmt_ci(ci: tuple[float, float, float], digits: int = 4) -> str:
    mean, lo, hi = ci
    if math.isnan(mean):
        return "n/a"
    if math.isnan(lo):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


@dataclass
class Claim:
    """One row of a verdict table: what is claimed, measured how, the numbers, the verdict."""

    claim: str
    measure: str
    a: str
    b: str
    difference: str
    verdict: str


def compare(claim: str, measure: str, a: Sequence[float], b: Sequence[float], *, kind: str = "better",
            higher_is_better: bool = True) -> Claim:
    """Paired comparison of arm B against arm A, seed by seed (the lists are in seed order)."""
    if len(a) != len(b):
        raise ValueError(f"{claim}: {len(a)} runs against {len(b)}; pairs need both arms of every seed")
    diff = mean_ci([y - x for x, y in zip(a, b, strict=True)])
    verdict = better(diff, higher_is_better) if kind == "better" else similar(diff)
    return Claim(claim, measure, fmt_ci(mean_ci(a)), fmt_ci(mean_ci(b)), fmt_ci(diff), verdict)


def claims_table(claims: Sequence[Claim], a_label: str = "SGD", b_label: str = "Backforward") -> str:
    a_head, b_head = (label if label in "AB" else f"{label} ({arm})" for label, arm in ((a_label, "A"), (b_label, "B")))
    rows = [f"| claim | measure | {a_head} | {b_head} | B − A, 95% CI | verdict |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {c.claim} | {c.measure} | {c.a} | {c.b} | {c.difference} | **{c.verdict}** |" for c in claims]
    return "\n".join(rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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


def band(ax, runs: Sequence[Sequence[dict]], key: str, label: str, color: str, x_key: str = "epoch",
         style: str = "-") -> None:
    """Mean curve over seeds with a 95% CI band; runs may have different lengths (diverged ones stop)."""
    length = max((len(r) for r in runs), default=0)
    xs, means, los, his = [], [], [], []
    for i in range(length):
        values = [r[i][key] for r in runs if len(r) > i]
        x = [r[i][x_key] for r in runs if len(r) > i]
        mean, lo, hi = mean_ci(values)
        xs.append(float(np.mean(x)))
        means.append(mean)
        los.append(lo if not math.isnan(lo) else mean)
        his.append(hi if not math.isnan(hi) else mean)
    ax.plot(xs, means, style, color=color, label=label)
    ax.fill_between(xs, los, his, color=color, alpha=0.2, linewidth=0)


def curves_figure(path: Path, panels: Sequence[tuple[str, dict[str, Sequence[Sequence[dict]]]]],
                  rows: Sequence[tuple[str, str, bool]], x_key: str = "epoch", x_label: str = "epoch") -> None:
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
    axes[0][0].legend()
    save_figure(fig, path)


# ---- the report file ----

SECTION_ORDER = ("reproduce", "depth", "batchnorm", "warmup", "order", "cost")


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
            "figure and verdict below is computed from the runs in `runs/`.\n\n" + RULES + "\n" + body + "\n")
    atomic_write_text(out / "REPORT.md", text)
    return out / "REPORT.md"


def final(runs: Sequence[Sequence[dict]], key: str) -> list[float]:
    """The last epoch's value of ``key`` in each run (NaN for a run with no epochs)."""
    return [r[-1][key] if r else math.nan for r in runs]


def area(runs: Sequence[Sequence[dict]], key: str) -> list[float]:
    """Mean of ``key`` over a run's epochs: lower for a loss that falls sooner."""
    return [float(np.mean([m[key] for m in r])) if r else math.nan for r in runs]
