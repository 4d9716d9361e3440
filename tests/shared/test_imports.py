import subprocess
import sys

HEAVY = ("torch", "pandas", "scipy", "pynvml", "numpy", "fastapi", "uvicorn", "httpx")


def _loaded_after(stmt: str) -> list[str]:
    code = f"import sys; {stmt}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_cli_import_is_light():
    assert _loaded_after("import straggler.cli") == []


# What `import straggler.cli` may load besides the standard library: an allow-list, so that any new
# import (not only a known heavy one) is a decision someone makes here, not a drift.
CLI_MAY_LOAD = {"click", "straggler"}
CLI_MAY_LOAD_OWN = {"straggler", "straggler.cli", "straggler.errors"}


def test_cli_import_loads_only_what_the_allow_list_names():
    code = (
        "import sys; before = set(sys.modules); import straggler.cli; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    outside = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)
    assert outside <= CLI_MAY_LOAD, f"straggler.cli loads {sorted(outside - CLI_MAY_LOAD)} at import"
    own = {m for m in loaded if m == "straggler" or m.startswith("straggler.")}
    assert own <= CLI_MAY_LOAD_OWN, f"straggler.cli imports {sorted(own - CLI_MAY_LOAD_OWN)} at import"
    assert "straggler.cli" in own  # the check saw the import it is about


def test_component_packages_import_without_side_effects():
    # Importing a component package starts nothing and loads no heavy library.
    assert (
        _loaded_after(
            "import straggler.probes, straggler.analysis, straggler.agent, straggler.collector, "
            "straggler.probes.telemetry, straggler.records, straggler.config"
        )
        == []
    )


def test_help_lists_commands_without_heavy_imports():
    code = (
        "import sys\nfrom straggler.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"print('HEAVY:', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("scan", "analyze", "agent", "collector"):
        assert name in out.stdout
    assert "HEAVY: []" in out.stdout
