"""The static checks of CI: the layer contract (import-linter), ruff's lint rules and format, and mypy.

    python tools/lint.py [imports|ruff|types ...] [--root DIR]

Each check exits non-zero on a finding; with no check named, all three run. The configuration of
each is in pyproject.toml (``[tool.importlinter]``, ``[tool.ruff]``, ``[tool.mypy]``); the layer
picture they enforce is docs/architecture.md.

The component folders (``probes/``, ``analysis/``, ...) install under ``straggler.`` through
pyproject's ``package-dir``, which neither import-linter nor mypy can follow in an editable
install: both read a copy of the tree laid out as installed (``straggler/probes/...``), made from
that same ``package-dir`` table, and mypy's file names are mapped back to the checkout's.
``--root`` checks another checkout (tests/shared/test_lint.py plants a wrong import in a copy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF_PATHS = ("probes", "analysis", "agent", "collector", "straggler", "tests", "benchmarks", "tools")


def _tool(name: str) -> str:
    """The tool beside this Python (the venv's), else on PATH; a missing one is one line, exit 2."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        sys.exit(f"tools/lint.py: {name} is not installed (pip install -e '.[test]')")
    return found


def stage(root: Path, dest: Path) -> dict[str, str]:
    """Copy the packages of ``root`` into ``dest`` as they install; returns {staged dir: source dir}."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {}
    for package, folder in sorted(cfg["package-dir"].items()):
        target = dest.joinpath(*package.split("."))
        shutil.copytree(
            root / folder,
            target,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "fixtures", "*.json"),
        )
        dirs[str(target)] = str(root / folder)
    return dirs


def check_imports(root: Path, staged: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(staged)}
    cmd = [_tool("lint-imports"), str(root / "pyproject.toml"), "--no-cache"]
    return subprocess.run(cmd, cwd=staged, env=env).returncode


def check_ruff(root: Path) -> int:
    """ruff's lint rules, then its formatter's check (``ruff format`` the tree to fix the second)."""
    paths = [p for p in RUFF_PATHS if (root / p).exists()]
    lint = subprocess.run([_tool("ruff"), "check", "--no-cache", *paths], cwd=root).returncode
    fmt = subprocess.run([_tool("ruff"), "format", "--check", "--no-cache", *paths], cwd=root).returncode
    return lint or fmt


def check_types(root: Path, staged: Path, dirs: dict[str, str]) -> int:
    env = {**os.environ, "MYPYPATH": str(staged)}
    cmd = [
        _tool("mypy"),
        "--config-file",
        str(root / "pyproject.toml"),
        "--cache-dir",
        str(staged / ".mypy"),
        "-p",
        "straggler",
    ]
    proc = subprocess.run(cmd, cwd=staged, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    # straggler/probes/x.py (the staged copy) -> probes/x.py (the checkout's file)
    for target, source in sorted(dirs.items(), key=lambda kv: -len(kv[0])):
        out = out.replace(os.path.relpath(target, staged) + "/", os.path.relpath(source, root) + "/")
    sys.stdout.write(out)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checks", nargs="*", metavar="imports|ruff|types")
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args(argv)
    checks = args.checks or ["imports", "ruff", "types"]
    unknown = sorted(set(checks) - {"imports", "ruff", "types"})
    if unknown:
        ap.error(f"unknown check(s) {', '.join(unknown)}; choose from imports, ruff, types")
    root = args.root.resolve()
    failed = []
    with tempfile.TemporaryDirectory(prefix="straggler-lint-") as tmp:
        staged = Path(tmp)
        dirs = stage(root, staged)
        for name in checks:
            print(f"+ {name}", flush=True)
            rc = {
                "imports": lambda: check_imports(root, staged),
                "ruff": lambda: check_ruff(root),
                "types": lambda: check_types(root, staged, dirs),
            }[name]()
            if rc:
                failed.append(name)
    if failed:
        print(f"tools/lint.py: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
