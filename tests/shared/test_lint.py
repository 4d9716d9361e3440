"""The static checks of CI (tools/lint.py): the layer contract of docs/architecture.md, ruff's lint
rules and mypy pass on this checkout, and the contract fails on a wrong import or a cycle planted
in a copy of it."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, skip_or_fail

PACKAGES = ("straggler", "probes", "analysis", "agent", "collector")


def lint(*args: str, root=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "lint.py"), *args, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        skip_or_fail(f"{module} is not installed (pip install -e '.[test]')")


def test_the_layer_contract_holds():
    need("importlinter")
    proc = lint("imports")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert "Contracts: 8 kept, 0 broken." in proc.stdout, proc.stdout[-4000:]


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory):
    """A copy of this checkout's packages and pyproject.toml, as a checkout of its own."""
    root = tmp_path_factory.mktemp("checkout")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


PLANTS = [
    # (file, line planted at its end, the contract that must break, what its report names)
    (
        "analysis/groups.py",
        "from straggler.collector import client",
        "One-way layers",
        "straggler.analysis.groups -> straggler.collector.client",
    ),
    (
        "probes/devices.py",
        "from straggler.scanverdict import device_report",
        "One-way layers",
        "straggler.probes.devices -> straggler.scanverdict",
    ),
    (
        "straggler/records.py",
        "from straggler.probes import devices",
        "One-way layers",
        "straggler.records -> straggler.probes.devices",
    ),
    ("probes/budget.py", "import httpx", "probes/ measures: no HTTP", "straggler.probes.budget -> httpx"),
    ("agent/idle.py", "import pynvml", "One funnel for NVML", "straggler.agent.idle -> pynvml"),
    ("probes/plan.py", "from . import runner", "No import cycle", ".plan -> .runner"),
]


@pytest.mark.parametrize("path,line,contract,named", PLANTS, ids=[p[0] + ": " + p[1] for p in PLANTS])
def test_the_layer_contract_fails_on_a_planted_wrong_import(copy_root, path, line, contract, named):
    need("importlinter")
    target = copy_root / path
    original = target.read_text()
    target.write_text(original + f"\n\ndef _planted():\n    {line}\n")
    try:
        proc = lint("imports", root=copy_root)
    finally:
        target.write_text(original)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr
    broken = proc.stdout.split("Broken contracts")[-1]
    assert contract in broken and named in broken, broken[-4000:]


def test_ruff_lint_rules_pass():
    need("ruff")
    proc = lint("ruff")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr


def test_mypy_passes_on_the_packages():
    need("mypy")
    proc = lint("types")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr
    assert "Success: no issues found" in proc.stdout, proc.stdout[-2000:]
