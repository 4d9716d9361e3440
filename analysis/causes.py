"""Why a flagged device is slow, from the telemetry columns recorded during its samples.

Each cause needs evidence in the device's own telemetry, compared with its peers'; when none
holds the cause is "unexplained" - never a guess. Telemetry columns are optional: a cause whose
columns are absent or NaN simply cannot be shown.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from straggler.records import parse_throttle

from . import groups

THERMAL = ("sw_thermal_slowdown", "hw_thermal_slowdown")
HW_SLOW = ("hw_slowdown", "hw_power_brake_slowdown")
REASONS = THERMAL + HW_SLOW + ("sw_power_cap", "applications_clocks_setting")
SHARE_MIN = 0.05  # a throttle reason active less than this share of the window is noise
CLOCK_LOW = 0.99  # a clock at most this fraction of the peers' is lower than theirs

# What to do next, per cause (the report shows it beside each flagged device; docs/analysis.md
# "Causes and what to do" is checked against it). The names are the causes explain() gives.
ACTIONS = {
    "thermal": "Check the node's cooling (fans, airflow, inlet temperature, heatsink contact) and re-test; "
    "a device that throttles in a cool node: drain and RMA.",
    "hw_slowdown": "The board signalled a hardware slowdown or power brake: check the power supply and cables "
    "(and an external power-brake signal), re-seat, re-test; if it persists, drain and RMA.",
    "power_capped": "At its power limit with a lower clock than its peers (silicon lottery, or a lower limit set): "
    "check the limit (nvidia-smi -q -d POWER); keep it with devices of its class, RMA when the "
    "deficit is large.",
    "pcie_link": "The PCIe link trains below its maximum generation or width: re-seat the device and its riser, "
    "check the slot (nvidia-smi -q -d PCIE), re-test.",
    "memory": "Memory errors or slow memory bandwidth: check ECC and row remapping (nvidia-smi -q -d "
    "ECC,ROW_REMAPPER); a pending remap needs a GPU reset; uncorrected errors or retired pages: "
    "drain and RMA.",
    "contention": "Another process used the device during the probe: find and stop it (nvidia-smi), then "
    "re-measure before acting on the verdict.",
    "whole_node": "The node, not its devices: compare its cooling, power, BIOS and firmware settings, CPU "
    "frequency governor and driver with a healthy node's; fix the node, then re-test.",
    "low_clock": "A lower clock than its peers with no throttle reason: check application clocks and clock "
    "locks (nvidia-smi -q -d CLOCK), reset them (nvidia-smi -rac), re-test.",
    "unexplained": "No telemetry names the cause: re-measure; if it stays slow, run the vendor diagnostics "
    "(dcgmi diag -r 3) and attach this report to the RMA ticket.",
}

# The one list of cause names (the ``causes`` column): explain() gives only these, the collector's
# ``cause`` label takes them (collector/metrics.py), the CLI words them with TEXT, the dashboards
# test checks the rule tests' labels against them. A new cause goes into ACTIONS and TEXT.
NAMES = tuple(ACTIONS)
UNEXPLAINED = "unexplained"  # flagged, and no telemetry names why (never a guess)

# Each cause in a few words, for tables (``straggler analyze``).
TEXT = {
    "thermal": "thermal slowdown",
    "hw_slowdown": "HW slowdown",
    "power_capped": "power-capped, lower clock",
    "pcie_link": "PCIe link degraded",
    "memory": "memory",
    "contention": "contention",
    "whole_node": "whole node slow",
    "low_clock": "low clock",
    UNEXPLAINED: "unexplained",
}

# The telemetry each cause rests on (explain() below reads these; the report marks them).
EVIDENCE_COLUMNS = {
    "thermal": ("temp_c", *THERMAL),
    "hw_slowdown": HW_SLOW,
    "power_capped": ("sw_power_cap", "sm_clock_mhz", "power_w", "power_limit_w"),
    "pcie_link": ("pcie_gen", "pcie_width"),
    "memory": ("ecc_uncorrected_total", "remapped_rows", "retired_pages"),
    "contention": ("processes",),
    "low_clock": ("sm_clock_mhz",),
}

# column -> how samples of one device are combined
TELEMETRY = {
    "sm_clock_mhz": "mean",
    "power_w": "mean",
    "power_limit_w": "mean",
    "temp_c": "max",
    "pcie_gen": "min",
    "pcie_gen_max": "max",
    "pcie_width": "min",
    "pcie_width_max": "max",
    "ecc_uncorrected_total": "max",
    "remapped_rows": "max",
    "retired_pages": "max",
    "processes": "max",
}


def device_telemetry(rows: pd.DataFrame, dev: np.ndarray, n_dev: int) -> dict[str, np.ndarray]:
    """Per-device telemetry (NaN where unknown) and the share of the window of each throttle reason."""
    out: dict[str, np.ndarray] = {}
    for col, how in TELEMETRY.items():
        if col not in rows.columns:
            continue
        v = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        if np.isfinite(v).any():
            out[col] = groups.mean(dev, v, n_dev) if how == "mean" else groups.extreme(dev, v, n_dev, how)
    if "throttle_reasons" in rows.columns:
        code, uniques = pd.factorize(rows["throttle_reasons"], use_na_sentinel=True)
        known = code >= 0
        parsed = [parse_throttle(u) or {} for u in uniques]  # unreadable: unknown (validate counts it)
        for reason in REASONS:
            share = np.array([p.get(reason, 0.0) for p in parsed] + [np.nan])
            out[reason] = groups.mean(dev, share[np.where(known, code, len(parsed))], n_dev)
    return out


def _get(tel: dict, name: str, n: int) -> np.ndarray:
    return tel.get(name, np.full(n, np.nan))


def explain(
    tel: dict[str, np.ndarray],
    flagged: np.ndarray,
    group_of_dev: np.ndarray,
    n_group: int,
    host_of_dev: np.ndarray,
    host_names,
    membw: np.ndarray,
) -> tuple[list[list[str]], list[str]]:
    """(causes, evidence) per device; empty for devices not flagged. ``host_of_dev``: host codes,
    ``host_names``: {device: host name} (at least for the flagged devices); ``membw``: the device's
    probe measures memory bandwidth."""
    n = len(flagged)
    peer = {k: groups.median(group_of_dev, v, n_group)[group_of_dev] for k, v in tel.items()}
    share = {r: np.nan_to_num(_get(tel, r, n)) for r in REASONS}
    thermal = share[THERMAL[0]] + share[THERMAL[1]]
    hw = share[HW_SLOW[0]] + share[HW_SLOW[1]]
    clock, clock_peer = _get(tel, "sm_clock_mhz", n), _get(peer, "sm_clock_mhz", n)
    with np.errstate(invalid="ignore", divide="ignore"):
        low_clock = clock <= CLOCK_LOW * clock_peer
    gen, width = _get(tel, "pcie_gen", n), _get(tel, "pcie_width", n)
    pcie = ((gen < _get(tel, "pcie_gen_max", n)) & (gen < _get(peer, "pcie_gen", n))) | (
        (width < _get(tel, "pcie_width_max", n)) & (width < _get(peer, "pcie_width", n))
    )
    ecc = _get(tel, "ecc_uncorrected_total", n) > 0
    remap = _get(tel, "remapped_rows", n) > np.nan_to_num(_get(peer, "remapped_rows", n))
    retired = _get(tel, "retired_pages", n) > np.nan_to_num(_get(peer, "retired_pages", n))
    contention = _get(tel, "processes", n) > 1

    # Whole node: every device of the host in this peer group is flagged (and there are >= 2).
    pair, n_pair = groups.factorize(group_of_dev, host_of_dev)
    per_pair = np.bincount(pair, minlength=n_pair)
    whole = (
        flagged & (per_pair[pair] >= 2) & (np.bincount(pair, weights=flagged, minlength=n_pair)[pair] == per_pair[pair])
    )

    causes: list = [()] * n  # immutable: tuples, empty for devices not flagged
    evidence = [""] * n
    for i in np.flatnonzero(flagged):
        c, e = [], []
        if whole[i]:
            c.append("whole_node")
            e.append(f"all {per_pair[pair[i]]} devices of host {host_names[i]} are slow")
        if thermal[i] >= SHARE_MIN:
            c.append("thermal")
            e.append(f"thermal slowdown {thermal[i]:.0%} of the window" + _vs(tel, peer, "temp_c", i, "C"))
        if hw[i] >= SHARE_MIN:
            c.append("hw_slowdown")
            e.append(f"hardware slowdown / power brake {hw[i]:.0%} of the window")
        if share["sw_power_cap"][i] >= 0.5 and low_clock[i]:
            c.append("power_capped")
            e.append(
                f"power-capped {share['sw_power_cap'][i]:.0%} of the window at a lower clock"
                + _vs(tel, peer, "sm_clock_mhz", i, "MHz")
                + _vs(tel, peer, "power_w", i, "W")
            )
        if pcie[i]:
            c.append("pcie_link")
            e.append(
                f"PCIe link gen{_n(gen[i])} x{_n(width[i])} below its maximum gen"
                f"{_n(_get(tel, 'pcie_gen_max', n)[i])} x{_n(_get(tel, 'pcie_width_max', n)[i])}"
            )
        if ecc[i] or remap[i] or retired[i] or membw[i]:
            c.append("memory")
            parts = [
                f"{w}"
                for w, f in (
                    ("uncorrected ECC errors", ecc[i]),
                    ("remapped rows", remap[i]),
                    ("retired pages", retired[i]),
                    ("slow memory bandwidth", membw[i]),
                )
                if f
            ]
            e.append("memory: " + ", ".join(parts))
        if contention[i]:
            c.append("contention")
            e.append(f"{_n(tel['processes'][i])} processes on the device during the probe")
        if not c and low_clock[i]:
            c.append("low_clock")
            e.append("clock lower than its peers without a throttle reason" + _vs(tel, peer, "sm_clock_mhz", i, "MHz"))
        if not c:
            c.append(UNEXPLAINED)
        causes[i], evidence[i] = tuple(c), "; ".join(e)
    return causes, evidence


def _n(x: float) -> str:
    return "?" if not np.isfinite(x) else f"{x:.0f}"


def _vs(tel: dict, peer: dict, col: str, i: int | np.integer, unit: str) -> str:
    if col not in tel or not np.isfinite(tel[col][i]):
        return ""
    return f", {col.split('_')[0]} {tel[col][i]:.0f} {unit} (peers {peer[col][i]:.0f})"
