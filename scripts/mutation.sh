#!/usr/bin/env bash
# Mutation testing of the library's core with mutmut, on demand (not in CI): README, "Development".
#
#   scripts/mutation.sh            every mutant, from scratch; writes the score into the README
#   scripts/mutation.sh --resume   the mutants the last run did not check (stopped early, or code changed since),
#                                  reusing its results for the rest; writes the score into the README
#   scripts/mutation.sh --survivors  every mutant the last run left alive, again (after tests were added);
#                                  writes the score into the README
#   scripts/mutation.sh NAME...    only these mutants (names or globs, e.g. 'backforward.stages.*'), reusing the
#                                  last run's results for the rest; prints the summary, leaves the README alone
#
# What is mutated, the tests each mutant runs and their options: [tool.mutmut] in pyproject.toml.
# Needs mutmut in the venv: .venv/bin/pip install -c constraints.txt mutmut==3.8.1
# On 2 shared cores the whole run takes about an hour; JOBS sets the number of worker processes (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import mutmut" 2>/dev/null; then
    echo "scripts/mutation.sh: mutmut is not installed: .venv/bin/pip install -c constraints.txt mutmut==3.8.1" >&2
    exit 2
fi
start=$(date +%s)
readme=yes timing=(--minutes)
if [ "${1:-}" = --resume ] || [ "${1:-}" = --survivors ]; then
    mode=$1
    shift
    timing=()  # a resumed run's wall time is not the whole run's
    # Tests may have changed since: record again which tests reach each function (mutmut keeps the old record
    # for tests whose names it knows, so a test changed under the same name would not be run on a mutant).
    rm -f mutants/mutmut-stats.json
    if [ "$mode" = --survivors ]; then
        set -- $(.venv/bin/mutmut results 2>/dev/null | awk '$2 == "survived" { sub(/:$/, "", $1); print $1 }')
    fi
elif [ $# -eq 0 ]; then
    rm -rf mutants  # mutated copies of src/ and tests/, and results, of the last run
else
    readme=no
fi
# mutmut redraws its progress line many times a second: keep the last state of each line.
.venv/bin/mutmut run --max-children "${JOBS:-2}" "$@" | tr '\r' '\n' | awk '
    /^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] / { progress = $0; if (++n % 200 == 0) { print progress; fflush() }; next }
    /^\s*$/ { next }
    { if (progress != "") print progress; progress = ""; print; fflush() }
    END { if (progress != "") print progress }'
minutes=$(( ($(date +%s) - start + 59) / 60 ))
[ ${#timing[@]} -gt 0 ] && timing=(--minutes "$minutes" --jobs "${JOBS:-2}")
if [ $readme = yes ]; then
    .venv/bin/python scripts/mutation_report.py "${timing[@]}" --readme README.md
else
    .venv/bin/python scripts/mutation_report.py
fi
