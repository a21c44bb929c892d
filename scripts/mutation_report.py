"""The score of the last mutmut run (scripts/mutation.sh) and every mutant it did not kill.

Each mutant not killed is either explained in scripts/mutation-equivalent.txt (its name, the line it mutates,
and one sentence: why no test can tell it from the code, or why this run cannot kill it) or reported as a gap.
The score counts killed mutants (a test failed or timed out) among those not argued equivalent; mutants this run
cannot kill but are not equivalent count against it. With ``--readme`` the summary and the lists replace the
block between the markers in the README's Development section.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

EQUIVALENT = Path("scripts/mutation-equivalent.txt")
BEGIN, END = "<!-- mutation score: written by scripts/mutation.sh -->", "<!-- end of mutation score -->"
KILLED = {"killed", "timeout"}


def results() -> dict[str, tuple[str, Path]]:
    """Mutant name -> (status, source file), from the last run's records under mutants/."""
    found = {}
    for source in config().only_mutate:
        meta = Path("mutants") / f"{source}.meta"
        if not meta.exists():
            sys.exit(f"scripts/mutation_report.py: no results for {source}: run scripts/mutation.sh first")
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            found[name] = (status_by_exit_code[code], Path(source))
    return found


def equivalents() -> dict[str, tuple[str, str, bool]]:
    """Mutant name -> (the mutated line, the reason, whether it is equivalent), from scripts/mutation-equivalent.txt.

    The file holds groups of ``name`` lines, each followed by ``+ mutated line``, closed by ``= why it is
    equivalent`` or by ``~ why this run cannot kill it`` (not equivalent: it counts against the score).
    """
    argued: dict[str, tuple[str, str, bool]] = {}
    pending: list[list[str]] = []
    for number, line in enumerate(EQUIVALENT.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("+ ") and pending and len(pending[-1]) == 1:
            pending[-1].append(line[2:].strip())
        elif line[:2] in ("= ", "~ ") and pending and all(len(p) == 2 for p in pending):
            argued.update({name: (mutated, line[2:].strip(), line[0] == "=") for name, mutated in pending})
            pending = []
        elif re.fullmatch(r"[\w.ǁ]+__mutmut_\d+", line) and (not pending or len(pending[-1]) == 2):
            pending.append([line])
        else:
            sys.exit(f"{EQUIVALENT}:{number}: expected a mutant name, '+ mutated line', '= reason' or '~ reason': "
                     f"{line}")
    if pending:
        sys.exit(f"{EQUIVALENT}: mutants without a reason at the end: {[p[0] for p in pending]}")
    return argued


def mutated_lines(name: str, path: Path) -> str:
    """The lines the mutant adds, as mutmut shows them (stripped, joined by ' / ')."""
    diff = get_diff_for_mutant(name, path=path).splitlines()
    return " / ".join(line[1:].strip() for line in diff if line.startswith("+") and not line.startswith("+++"))


def short(name: str) -> tuple[str, int]:
    """``backforward.engines.xǁStageGradientsǁwhere__mutmut_2`` -> (``engines.StageGradients.where``, 2)."""
    function, _, number = name.rpartition("__mutmut_")
    module, _, mangled = function.removeprefix("backforward.").partition(".x")
    return f"{module}.{mangled.lstrip('_ǁ').replace('ǁ', '.') if 'ǁ' in mangled else mangled[1:]}", int(number)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, help="write the summary into this README")
    parser.add_argument("--minutes", type=int, help="the run's wall time, to report")
    parser.add_argument("--jobs", type=int, default=2, help="the run's worker processes, to report")
    args = parser.parse_args()
    found = results()
    argued = equivalents()
    counts: dict[str, int] = defaultdict(int)
    for status, _ in found.values():
        counts[status] += 1
    unchecked = counts["not checked"]
    equivalent, explained, gaps, stale = [], [], [], []
    for name, (status, path) in found.items():
        if status in KILLED or status == "not checked":
            if name in argued and status in KILLED:
                stale.append(f"{name}: now {status}")
            continue
        line = mutated_lines(name, path)
        if name in argued and argued[name][0] == line:
            (equivalent if argued[name][2] else explained).append(name)
        elif name in argued:
            stale.append(f"{name}: the file says '+ {argued[name][0]}', the mutant is now '+ {line}'")
            gaps.append((name, status, line))
        else:
            gaps.append((name, status, line))
    stale += [f"{name}: no such mutant now" for name in argued if name not in found]
    killed = sum(counts[s] for s in KILLED)
    considered = len(found) - unchecked - len(equivalent)
    files = ", ".join(Path(s).name for s in config().only_mutate)
    tally = (f"mutants: {len(found)}; killed: {counts['killed']}; timed out (killed): {counts['timeout']}; "
             f"survived: {counts['survived']}; no tests: {counts['no tests']}")
    summary = [
        f"mutmut {version('mutmut')} on src/backforward/{{{files.replace('.py', '')}}}.py",
        tally + (f"; not checked: {unchecked}" if unchecked else ""),
        f"argued equivalent: {len(equivalent)}; not killed here, explained: {len(explained)} "
        "(scripts/mutation-equivalent.txt)",
        f"score: {killed} of {considered} non-equivalent mutants killed: {100 * killed / max(considered, 1):.1f}%",
    ]
    if args.minutes is not None:
        summary.append(f"wall time: {args.minutes} minutes, {args.jobs} worker processes")
    print("\n".join(summary))
    if gaps:
        print(f"\nnot killed and not argued equivalent ({len(gaps)}):")
        for name, status, line in gaps:
            print(f"  {name} ({status}): + {line}")
    if stale:
        print(f"\nout of date in {EQUIVALENT} ({len(stale)}):")
        for entry in stale:
            print(f"  {entry}")
    if args.readme is not None:
        write_readme(args.readme, summary, equivalent, explained, gaps, argued)


def grouped(names: list[str], argued: dict) -> list[str]:
    """One line per reason: the functions and mutant numbers it covers, then the reason."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_reason[argued[name][1]].append(name)
    lines = []
    for reason, covered in by_reason.items():
        functions: dict[str, list[int]] = defaultdict(list)
        for name in covered:
            function, number = short(name)
            functions[function].append(number)
        where = "; ".join(f"`{f}` #{', #'.join(map(str, sorted(n)))}" for f, n in functions.items())
        lines.append(f"- {where}: {reason}")
    return lines


def write_readme(readme: Path, summary: list[str], equivalent: list[str], explained: list[str], gaps: list,
                 argued: dict) -> None:
    lines = [BEGIN, "```", *summary, "```", ""]
    if gaps:
        lines += [f"Not killed and not explained ({len(gaps)}):", ""]
        lines += [f"- `{short(name)[0]}` #{short(name)[1]} ({status}): `{line}`" for name, status, line in gaps]
        lines.append("")
    if explained:
        lines += [f"Not killed by this run, and not equivalent ({len(explained)}):", "",
                  *grouped(explained, argued), ""]
    lines += [f"<details><summary>The {len(equivalent)} mutants argued equivalent, and why</summary>", "",
              *grouped(equivalent, argued), "", "</details>", END]
    text = readme.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    readme.write_text(text[:start] + "\n".join(lines) + text[end:])


if __name__ == "__main__":
    main()
