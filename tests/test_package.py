"""The library stands on torch alone; the experiment harness sits beside it as an extra."""

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

from backforward.experiments import cli

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "backforward"


def test_import_backforward_loads_nothing_beyond_torch():
    code = ("import sys, torch; before = set(sys.modules); import backforward; "
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith('backforward')))"
            "; print(sorted(m for m in sys.modules if m.startswith('backforward.experiments')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "[]"]


def test_library_modules_import_torch_and_the_standard_library_alone():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for path in LIBRARY.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or (node.level == 0 and node.module.split(".")[0] in allowed), \
                    f"{path.name} imports {node.module}"
                assert "experiments" not in (node.module or ""), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed, f"{path.name} imports {alias.name}"


def test_install_requires_torch_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch"]
    assert {"numpy", "scipy", "matplotlib", "tqdm", "mlxtend"} <= {
        d.split(">")[0] for d in project["optional-dependencies"]["experiments"]}


def test_command_line_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(cli, "missing_extra", lambda: ["scipy"])
    assert cli.main(["toy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'backforward[experiments]'" in err and "scipy" in err
