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
# The README shows the two bench outputs verbatim, in the first two plain code blocks of its Results section.
.venv/bin/python - <<'PY'
import re
from pathlib import Path

readme = Path("README.md")
text = readme.read_text()
start, end = text.index("## Results"), text.index("## Layout")
section = text[start:end]
outputs = iter(Path(f"docs/results/{name}").read_text().rstrip() for name in ("bench.txt", "bench-distributed.txt"))
section = re.sub(r"^```\n.*?\n```$", lambda _: f"```\n{next(outputs)}\n```", section, count=2, flags=re.S | re.M)
readme.write_text(text[:start] + section + text[end:])
PY
.venv/bin/python -m pytest -q tests/test_docs.py
