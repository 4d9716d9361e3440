import subprocess
import sys

HEAVY = ("torch", "pandas", "scipy", "pynvml", "numpy", "fastapi", "uvicorn", "httpx")


def _loaded_after(stmt: str) -> list[str]:
    code = f"import sys; {stmt}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_cli_import_is_light():
    assert _loaded_after("import straggler.cli") == []


def test_component_packages_import_without_side_effects():
    # Importing a component package starts nothing and loads no heavy library.
    assert _loaded_after(
        "import straggler.probes, straggler.analysis, straggler.agent, straggler.collector, "
        "straggler.probes.telemetry, straggler.records, straggler.config"
    ) == []


def test_help_lists_commands_without_heavy_imports():
    code = ("import sys\nfrom straggler.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            f"print('HEAVY:', [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("scan", "analyze", "agent", "collector"):
        assert name in out.stdout
    assert "HEAVY: []" in out.stdout
