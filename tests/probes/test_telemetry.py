"""Telemetry backends: NVML decoding against the real pynvml, the CPU backend through psutil, the fake
backend replaying scenario fixtures (faults included), the sampler and fixture recording."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pynvml
import pytest

from straggler.errors import InputError
from straggler.probes import nvml
from straggler.probes.backends import open_backend
from straggler.probes.cputelemetry import CpuBackend, cpu_model
from straggler.probes.fakenvml import FIXTURE_DIR, FakeBackend
from straggler.probes.fakepynvml import FakePynvml
from straggler.probes.fixture_recorder import record_fixture
from straggler.probes.sampler import Sampler, summarize
from straggler.probes.telemetry import (
    READING_FIELDS,
    STATUS_ERROR,
    STATUS_LOST,
    STATUS_OK,
    THROTTLE_REASONS,
    TelemetryBackend,
    reading_to_dict,
)
from straggler.records import parse_throttle

SCENARIOS = (
    "h100_healthy",
    "h100_thermal_throttle",
    "h100_power_capped_low_clock",
    "pcie_gen3_downgrade",
    "ecc_remapped_rows",
    "nvml_error_mid_run",
    "gpu_fallen_off_bus",
    "h100_idle",
    "h100_xid_errors",
    "v100_retired_pages",
)


def _nvml_works() -> bool:
    b = nvml.NvmlBackend()
    try:
        return b.device_count() > 0
    finally:
        b.close()


# --- NVML decoding against the real pynvml module ---------------------------------------------


@pytest.mark.parametrize(
    "constant, name",
    [
        ("nvmlClocksEventReasonGpuIdle", "gpu_idle"),
        ("nvmlClocksEventReasonApplicationsClocksSetting", "applications_clocks_setting"),
        ("nvmlClocksEventReasonSwPowerCap", "sw_power_cap"),
        ("nvmlClocksEventReasonHwSlowdown", "hw_slowdown"),
        ("nvmlClocksEventReasonSyncBoost", "sync_boost"),
        ("nvmlClocksEventReasonSwThermalSlowdown", "sw_thermal_slowdown"),
        ("nvmlClocksEventReasonHwThermalSlowdown", "hw_thermal_slowdown"),
        ("nvmlClocksEventReasonHwPowerBrakeSlowdown", "hw_power_brake_slowdown"),
        ("nvmlClocksEventReasonDisplayClockSetting", "display_clocks_setting"),
    ],
)
def test_each_clock_event_bit_decodes_to_its_name(constant, name):
    assert nvml.decode_clock_events(getattr(pynvml, constant)) == {name}


def test_clock_event_masks_decode_to_every_active_reason():
    mask = pynvml.nvmlClocksEventReasonHwSlowdown | pynvml.nvmlClocksEventReasonSwThermalSlowdown
    assert nvml.decode_clock_events(mask) == {"hw_slowdown", "sw_thermal_slowdown"}
    assert nvml.decode_clock_events(pynvml.nvmlClocksEventReasonNone) == frozenset()
    assert nvml.decode_clock_events(pynvml.nvmlClocksEventReasonAll) == set(THROTTLE_REASONS)


@pytest.mark.parametrize(
    "value, code",
    [
        (pynvml.NVML_ERROR_NOT_SUPPORTED, "not_supported"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, "gpu_is_lost"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no_permission"),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "library_not_found"),
        (pynvml.NVML_ERROR_TIMEOUT, "timeout"),
        (pynvml.NVML_ERROR_UNKNOWN, "unknown"),
    ],
)
def test_nvml_errors_become_named_failures(value, code):
    err = pynvml.NVMLError(value)  # pynvml returns its specific subclass (e.g. NVMLError_GpuIsLost)
    assert isinstance(err, pynvml.NVMLError) and type(err) is not pynvml.NVMLError

    def call():
        raise err

    assert nvml._query(call) == nvml.NvmlFailure(code)


def test_build_reading_maps_failures_to_statuses():
    ident = {"uuid": "GPU-x", "model": "m", "pci_bus_id": "00000000:18:00.0"}
    r = nvml.build_reading(2, 1.0, ident, {"power_w": nvml.NvmlFailure("not_supported"), "temp_c": 40.0})
    assert r.status == STATUS_OK and r.power_w is None and r.temp_c == 40.0
    assert r.errors == {"power_w": "not_supported"}
    lost = nvml.build_reading(2, 1.0, ident, {"temp_c": 40.0, "power_w": nvml.NvmlFailure("gpu_is_lost")})
    assert lost.status == STATUS_LOST and lost.temp_c is None and lost.uuid == "GPU-x" and lost.index == 2
    bad = nvml.build_reading(2, 1.0, ident, {}, device_error="unknown")
    assert bad.status == STATUS_ERROR and bad.errors == {"device": "unknown"}


def test_nvml_without_library_is_a_snapshot_error_with_a_hint():
    if _nvml_works():
        pytest.skip("an NVML library with GPUs is present on this host")
    b = nvml.NvmlBackend()
    snap = b.snapshot("h")
    assert snap.devices == () and "NVML library not found" in snap.error and "cpu backend" in snap.error
    assert b.device_count() == 0
    assert b.read(0).status == STATUS_ERROR


def test_auto_falls_back_to_cpu_with_the_reason(monkeypatch):
    if _nvml_works():
        pytest.skip("an NVML library with GPUs is present on this host")
    monkeypatch.delenv("STRAGGLER_TELEMETRY", raising=False)
    b = open_backend("auto")
    assert b.name == "cpu" and "NVML library not found" in b.notice
    assert b.device_count() == os.cpu_count()


def test_env_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("STRAGGLER_TELEMETRY", "fake:h100_healthy")
    assert open_backend().name == "fake:h100_healthy"
    assert open_backend("auto").device_count() == 8
    assert open_backend("cpu").name == "cpu"  # an explicit spec wins


def test_unknown_spec_and_missing_fixture_are_one_line_input_errors():
    with pytest.raises(InputError, match="unknown telemetry backend 'gpu'"):
        open_backend("gpu")
    with pytest.raises(InputError, match="no such telemetry fixture"):
        open_backend("fake:no_such_scenario")


def test_bad_fixture_names_file_and_field(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"devices": [{"frames": [{"sm_clock_ghz": 1.9}]}]}))
    with pytest.raises(InputError, match=r"bad.json: device 0 frame 0: unknown reading field\(s\): sm_clock_ghz"):
        open_backend(f"fake:{p}")
    p.write_text("{not json")
    with pytest.raises(InputError, match="cannot read fixture"):
        open_backend(f"fake:{p}")


def test_every_backend_implements_the_protocol(monkeypatch):
    monkeypatch.delenv("STRAGGLER_TELEMETRY", raising=False)
    for b in (nvml.NvmlBackend(), CpuBackend(), FakeBackend("h100_healthy"), open_backend("auto")):
        assert isinstance(b, TelemetryBackend)


def test_importing_backends_loads_no_pynvml_or_psutil():
    code = (
        "import sys, straggler.probes.backends, straggler.probes.nvml, straggler.probes.fakenvml, "
        "straggler.probes.sampler, straggler.probes.cputelemetry, straggler.probes.fixture_recorder; "
        "print([m for m in ('pynvml', 'psutil', 'torch', 'pandas') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# --- fixtures and the fake backend --------------------------------------------------------------


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if not s.startswith("v100")])
def test_fixture_is_marked_synthetic_and_replays_eight_h100s(scenario):
    data = json.loads((FIXTURE_DIR / f"{scenario}.json").read_text())
    assert data["source"].startswith("synthetic: hand-written from published H100 SXM specifications")
    snap = FakeBackend(scenario).snapshot("node1")
    assert len(snap.devices) == 8 and snap.backend == f"fake:{scenario}" and snap.error is None
    assert len({d.uuid for d in snap.devices}) == 8
    for d in snap.devices:
        assert d.model == "NVIDIA H100 80GB HBM3" and d.sm_clock_max_mhz == 1980.0
        assert d.pcie_gen_max == 5 and d.pcie_width_max == 16
        # H100 retires no pages (it remaps rows): NOT_SUPPORTED -> None with the reason
        assert d.retired_pages is None and d.errors["retired_pages"] == "not_supported"


def test_v100_fixture_retires_pages_and_has_no_row_remapping():
    data = json.loads((FIXTURE_DIR / "v100_retired_pages.json").read_text())
    assert data["source"].startswith("synthetic: hand-written from published V100 SXM2 specifications")
    snap = FakeBackend("v100_retired_pages").snapshot("node1")
    assert [d.retired_pages for d in snap.devices] == [0, 12, 0, 0, 0, 0, 0, 0]
    assert all(d.remapped_rows is None and d.errors["remapped_rows"] == "not_supported" for d in snap.devices)


def _window_summary(backend, index, reads=6):
    readings = [backend.read(index) for _ in range(reads)]
    return summarize(readings)


def test_thermal_throttle_scenario_shows_on_gpu3_only():
    b = FakeBackend("h100_thermal_throttle")
    hot = _window_summary(b, 3)
    assert hot["temp_c"] >= 88 and hot["sm_clock_mhz"] < 1500
    shares = parse_throttle(hot["throttle_reasons"])
    assert shares["sw_thermal_slowdown"] == 1.0 and 0 < shares["hw_thermal_slowdown"] < 1
    cool = _window_summary(b, 0)
    assert cool["temp_c"] < 70 and "thermal" not in (cool["throttle_reasons"] or "")


def test_power_cap_pcie_and_ecc_scenarios():
    capped = _window_summary(FakeBackend("h100_power_capped_low_clock"), 6)
    assert capped["power_limit_w"] == 450.0 and parse_throttle(capped["throttle_reasons"]) == {"sw_power_cap": 1.0}
    pcie = FakeBackend("pcie_gen3_downgrade")
    assert (_window_summary(pcie, 2)["pcie_gen"], _window_summary(pcie, 2)["pcie_gen_max"]) == (3, 5)
    assert _window_summary(pcie, 1)["pcie_gen"] == 5
    ecc = FakeBackend("ecc_remapped_rows")
    bad = _window_summary(ecc, 4)
    assert (bad["remapped_rows"], bad["ecc_corrected_total"], bad["ecc_uncorrected_total"]) == (4, 2113, 3)
    assert _window_summary(ecc, 0)["remapped_rows"] == 0  # zero is a measured zero here, not a default


def test_gpu_falls_off_the_bus_mid_run():
    b = FakeBackend("gpu_fallen_off_bus")
    readings = [b.read(7) for _ in range(8)]
    assert [r.status for r in readings] == [STATUS_OK] * 4 + [STATUS_LOST] * 4
    lost = readings[-1]
    assert lost.uuid == readings[0].uuid and lost.pci_bus_id == "00000000:DB:00.0"
    assert lost.sm_clock_mhz is None and lost.power_w is None and lost.errors == {"device": "gpu_is_lost"}
    snap = b.snapshot("n")  # the pass over the other GPUs goes on
    assert [d.status for d in snap.devices] == [STATUS_OK] * 7 + [STATUS_LOST]


def test_nvml_error_mid_run_recovers_and_field_errors_persist():
    b = FakeBackend("nvml_error_mid_run")
    statuses = [b.read(1).status for _ in range(11)]
    assert statuses == [STATUS_OK] * 6 + [STATUS_ERROR] * 3 + [STATUS_OK] * 2
    power = [b.read(4) for _ in range(6)]
    assert [r.power_w is None for r in power] == [False] * 3 + [True] * 3
    assert power[-1].errors["power_w"] == "timeout" and power[-1].status == STATUS_OK
    assert power[-1].sm_clock_mhz is not None


# --- the sampler -----------------------------------------------------------------------------------


def test_sampler_samples_in_background_and_summarises_its_window():
    b = FakeBackend("h100_thermal_throttle")
    with Sampler(b, 3, interval_s=0.02).window() as w:
        time.sleep(0.3)
    readings = w.readings
    assert len(readings) >= 5  # start + background + end (noisy machine: far fewer than 17 is fine)
    s = w.summary()
    assert s["sm_clock_mhz"] == pytest.approx(statistics.fmean(r.sm_clock_mhz for r in readings))
    assert s["temp_c"] == max(r.temp_c for r in readings)
    hw = sum("hw_thermal_slowdown" in r.throttle_reasons for r in readings) / len(readings)
    assert parse_throttle(s["throttle_reasons"])["hw_thermal_slowdown"] == pytest.approx(hw, abs=1e-3)
    assert s["model"] == "NVIDIA H100 80GB HBM3" and s["driver"] == "550.54.15"
    assert readings[0].ts <= readings[-1].ts


def test_sampler_keeps_one_reading_at_start_and_end_of_an_empty_window():
    with Sampler(FakeBackend("h100_healthy"), 0, interval_s=10).window() as w:
        pass
    assert len(w.readings) == 2 and w.ok


def test_summary_of_a_lost_gpu_keeps_what_was_measured_and_none_for_the_rest():
    b = FakeBackend("gpu_fallen_off_bus")
    s = summarize([b.read(7) for _ in range(8)])
    assert s["sm_clock_mhz"] is not None  # the four readings before it fell off
    lost_only = summarize([b.read(7) for _ in range(3)])
    assert all(lost_only[k] is None for k in ("sm_clock_mhz", "power_w", "temp_c", "throttle_reasons"))
    assert lost_only["model"] == "NVIDIA H100 80GB HBM3"


# --- the CPU backend (real psutil) -----------------------------------------------------------------


def test_cpu_backend_reads_every_core():
    b = CpuBackend()
    snap = b.snapshot("h")
    assert len(snap.devices) == os.cpu_count()
    for i, d in enumerate(snap.devices):
        assert d.uuid == f"cpu{i}" and d.index == i and d.model == cpu_model() and d.status == STATUS_OK
        assert d.power_w is None and d.pcie_gen is None  # nothing a CPU core has: missing, not 0
        assert d.util_pct is None  # first read: no interval yet
        if d.sm_clock_mhz is not None:
            assert 100 < d.sm_clock_mhz < 10_000
        if d.temp_c is None:
            assert d.errors["temp_c"] == "no_sensor"


def test_cpu_utilization_sees_a_busy_process_pinned_to_core_0():
    b = CpuBackend()
    b.read(0)
    spin = "import os, time; os.sched_setaffinity(0, {0}); t = time.time() + 1.5\nwhile time.time() < t: pass"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)
        b.read(0)  # interval starts once the spinner runs
        time.sleep(0.8)
        busy = b.read(0).util_pct
    finally:
        proc.wait(timeout=30)
    assert busy is not None and busy > 60


# --- recording ----------------------------------------------------------------------------------


def test_record_fixture_round_trips_the_cpu_backend(tmp_path):
    path = record_fixture(CpuBackend(), tmp_path / "cpu_here.json", duration_s=0.3, interval_s=0.1)
    data = json.loads(path.read_text())
    assert data["source"].startswith(f"recorded on {cpu_model()} linux-")
    assert data["backend"] == "cpu" and len(data["devices"]) == os.cpu_count()
    frames = data["devices"][0]["frames"]
    assert 3 <= len(frames) <= 5
    replay = open_backend(f"fake:{path}")
    got = [replay.read(0) for _ in frames]
    for r, f in zip(got, frames):
        assert r.uuid == "cpu0" and r.sm_clock_mhz == f["sm_clock_mhz"] and r.util_pct == f["util_pct"]
        assert dict(r.errors) == f["errors"]


def test_record_fixture_keeps_faults_as_data(tmp_path):
    src = FakeBackend("gpu_fallen_off_bus")
    path = record_fixture(src, tmp_path / "lost.json", duration_s=0.5, interval_s=0.05)
    replay = FakeBackend(str(path))
    statuses = [replay.read(7).status for _ in range(8)]
    assert statuses == [STATUS_OK] * 4 + [STATUS_LOST] * 4
    assert replay.read(0).errors["retired_pages"] == "not_supported"
    assert set(json.loads(path.read_text())["devices"][0]["frames"][0]) <= set(READING_FIELDS)


# --- real GPUs (run by benchmarks/gpu_check.py on a GPU node) ------------------------------------


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the NVML backend is checked on hardware by benchmarks/gpu_check.py")


@pytest.mark.gpu
def test_nvml_backend_reads_every_real_gpu(tmp_path):
    _require_cuda()
    b = open_backend("nvml")
    try:
        n = b.device_count()
        assert n >= 1 and b.init_error is None
        snap = b.snapshot("gpu-node")
        assert snap.error is None and len(snap.devices) == n
        for d in snap.devices:
            assert d.status == STATUS_OK, d.errors
            assert d.uuid.startswith("GPU-") and d.model and d.pci_bus_id and d.driver
            assert 0 < d.sm_clock_mhz <= d.sm_clock_max_mhz and d.power_limit_w > 0 and 0 < d.temp_c < 110
            assert d.throttle_reasons is not None and d.throttle_reasons <= set(THROTTLE_REASONS)
            assert 1 <= d.pcie_gen <= d.pcie_gen_max and 1 <= d.pcie_width <= d.pcie_width_max
            assert d.mem_total_bytes > 0 and d.processes is not None
        path = record_fixture(b, tmp_path / "here.json", duration_s=0.5, interval_s=0.1)
        assert json.loads(path.read_text())["source"].startswith(f"recorded on {snap.devices[0].model}")
        replay = FakeBackend(str(path)).snapshot("gpu-node")
        assert [d.uuid for d in replay.devices] == [d.uuid for d in snap.devices]
    finally:
        b.close()


def test_sampler_window_reports_a_gpu_lost_mid_window():
    with Sampler(FakeBackend("gpu_fallen_off_bus"), 7, interval_s=0.01).window() as w:
        time.sleep(0.2)
    assert w.statuses[STATUS_OK] == 4 and w.statuses[STATUS_LOST] >= 2 and not w.ok
    assert w.summary()["sm_clock_mhz"] == pytest.approx(statistics.fmean(r.sm_clock_mhz for r in w.readings[:4]))


def test_auto_follows_the_kind_of_device_probed(monkeypatch):
    from straggler.probes.backends import ENV_VAR, open_backend

    monkeypatch.delenv(ENV_VAR, raising=False)
    cpu = open_backend("auto", kind="cpu")
    assert cpu.name == "cpu"  # never GPU telemetry for CPU cores, even on a GPU host
    cpu.close()
    gpu = open_backend("auto", kind="cuda")
    assert gpu.name == "nvml"  # never a CPU core's reading for a GPU; here NVML sees nothing
    assert gpu.device_count() == 0
    gpu.close()
    monkeypatch.setenv(ENV_VAR, "fake:h100_healthy")
    assert open_backend("auto", kind="cpu").name == "fake:h100_healthy"  # the test override still wins


def test_cpu_core_temperatures_only_where_they_can_be_attributed(monkeypatch):
    # This machine has no temperature sensors: the sensor list is what psutil reports on hosts that do.
    from collections import namedtuple

    import psutil

    from straggler.probes.cputelemetry import CpuBackend

    shwtemp = namedtuple("shwtemp", "label current high critical")  # psutil's entry fields

    one = {
        "coretemp": [
            shwtemp("Package id 0", 50.0, 80, 100),
            shwtemp("Core 0", 41.0, 80, 100),
            shwtemp("Core 1", 47.0, 80, 100),
        ]
    }
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: one, raising=False)
    assert CpuBackend._temps() == {0: 41.0, 1: 47.0}
    two = {"coretemp": [*one["coretemp"], shwtemp("Package id 1", 60.0, 80, 100), shwtemp("Core 0", 66.0, 80, 100)]}
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: two, raising=False)
    assert CpuBackend._temps() == {}  # core 0 of which socket? missing, never the other socket's value


# --- the NVML backend's own code over a pynvml-shaped fake ------------------------------------


def _dicts(snapshot):
    return [{k: v for k, v in reading_to_dict(d).items() if k != "ts"} for d in snapshot.devices]


def test_nvml_funnel_turns_non_nvml_exceptions_into_statuses():
    """An older nvidia-ml-py without nvmlDeviceGetRemappedRows (AttributeError), a GPU name that is
    not UTF-8 (UnicodeDecodeError) and a function the driver lacks (FUNCTION_NOT_FOUND) are
    statuses on the reading; the pass over every GPU goes on."""
    b = nvml.NvmlBackend(library=FakePynvml("nvml_older_library_bad_name"))
    snap = b.snapshot("h")
    assert snap.error is None and len(snap.devices) == 2
    d0, d1 = snap.devices
    assert d0.status == STATUS_OK and d0.remapped_rows is None
    # one pynvml function serves the remapped-row counts and flags: all three miss together
    assert d0.errors == {
        "remapped_rows": "function_not_found",
        "remapped_rows_pending": "function_not_found",
        "remapped_rows_failed": "function_not_found",
        "retired_pages": "not_supported",
    }
    assert d0.temp_c == 31.0 and d0.power_w == 69.0 and d0.model == "NVIDIA H100 80GB HBM3" and d0.processes == 0
    assert d1.status == STATUS_OK and d1.model is None and d1.throttle_reasons is None
    assert d1.errors == {
        "model": "invalid_text",
        "throttle_reasons": "function_not_found",
        "retired_pages": "not_supported",
    }
    assert d1.uuid and d1.util_pct == 0.0 and d1.processes == 0
    # the fake backend replays the same fixture into the same statuses
    assert _dicts(FakeBackend("nvml_older_library_bad_name").snapshot("h")) == _dicts(snap)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_nvml_backend_over_the_fixture_reads_what_the_fake_backend_replays(scenario):
    ours, fake = nvml.NvmlBackend(library=FakePynvml(scenario)), FakeBackend(scenario)
    for _ in range(10):  # past every fault's start and end
        assert _dicts(ours.snapshot("h")) == _dicts(fake.snapshot("h"))


def test_xid_events_are_counted_through_the_nvml_funnel_by_code():
    """XID events arrive on an NVML event set registered per device; each read drains what came
    since the last one and the reading carries the counts since the backend started, by code."""
    b = nvml.NvmlBackend(library=FakePynvml("h100_xid_errors"))
    for _ in range(3):  # read again: events already counted are not counted twice
        snap = b.snapshot("h")
        assert snap.devices[2].xid_errors == {48: 1} and snap.devices[5].xid_errors == {13: 3}
        assert snap.devices[0].xid_errors == {} and "xid_errors" not in snap.devices[0].errors
    b.close()


def test_remapped_rows_pending_and_failed_are_read_with_the_row_counts():
    d4 = nvml.NvmlBackend(library=FakePynvml("ecc_remapped_rows")).snapshot("h").devices[4]
    assert d4.remapped_rows == 4 and d4.remapped_rows_pending is True and d4.remapped_rows_failed is True
