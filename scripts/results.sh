#!/usr/bin/env bash
# Write docs/results and the README's Results section again, from runs on this machine.
# Run it on an otherwise idle machine (the bench times steps); on 2 cores it takes about an hour and a half.
set -euo pipefail
cd "$(dirname "$0")/.."
backforward=.venv/bin/backforward
rm -rf runs/report runs/bench
$backforward reproduce --out runs/report
$backforward study all --out runs/report
.venv/bin/python -m backforward.experiments.report runs/report docs/results README.md
$backforward bench --out runs/bench > docs/results/bench.txt
cp runs/bench/bench.png docs/results/bench.png
$backforward bench --distributed > docs/results/bench-distributed.txt
# The README shows the bench outputs verbatim, in the first plain code blocks of its Results section: the two
# above, then the GPU ones that scripts/cuda.sh wrote on a GPU machine (copied into docs/results).
.venv/bin/python - <<'PY'
from pathlib import Path

readme = Path("README.md")
lines = readme.read_text().split("\n")
start, end = lines.index("## Results"), lines.index("## Layout")
outputs = [Path(f"docs/results/{name}").read_text().rstrip().split("\n") for name in
           ("bench.txt", "bench-distributed.txt", "bench-cuda.txt", "bench-cuda-large.txt")]
opening, i = [], start  # the lines opening a plain code block (```, not ```bash), in order
while i < end:
    if lines[i].startswith("```"):
        close = lines.index("```", i + 1)
        if lines[i] == "```":
            opening.append((i, close))
        i = close
    i += 1
for (first, close), output in reversed(list(zip(opening, outputs))):
    lines[first + 1:close] = output
readme.write_text("\n".join(lines))
PY
.venv/bin/python -m pytest -q tests/test_docs.py
