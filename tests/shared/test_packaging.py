"""Both install modes work: the top-level component folders install under `straggler.`."""

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

PACKAGES = (
    "straggler",
    "straggler/commands",
    "straggler/probes",
    "straggler/analysis",
    "straggler/agent",
    "straggler/collector",
)


@pytest.mark.timeout(180)
def test_regular_wheel_contains_every_component(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("straggler-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names, pkg
    assert "straggler/records.py" in names and "straggler/probes/telemetry.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "straggler = straggler.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # the telemetry scenarios ship as package data: `--telemetry fake:<scenario>` works from the wheel
    shipped = {n.rsplit("/", 1)[1][:-5] for n in names if n.startswith("straggler/probes/fixtures/")}
    assert shipped == {p.stem for p in (ROOT / "probes" / "fixtures").glob("*.json")} and "h100_healthy" in shipped
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    replay = (
        "import straggler.probes.fakenvml as f; from straggler.probes.backends import open_backend; "
        "b = open_backend('fake:h100_thermal_throttle'); print(f.__file__); print(b.device_count(), b.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", replay],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    where, counted = out.stdout.splitlines()
    assert where.startswith(str(site))  # the wheel's copy, not this checkout
    assert counted == "8 fake:h100_thermal_throttle"


def test_editable_install_maps_component_folders():
    import straggler.analysis
    import straggler.probes

    assert straggler.probes.__file__.startswith(str(ROOT / "probes"))
    assert straggler.analysis.__file__.startswith(str(ROOT / "analysis"))
