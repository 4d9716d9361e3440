"""Placement hints for Slurm from the analysis' performance classes (``perf_class`` A-D).

A node runs a synchronous job at the pace of its slowest device, so a node's class is the slowest
class among its devices (``D`` slowest); a node none of whose devices has a class (peer groups of
fewer than 4 devices) gets no hint and keeps its settings. Each class maps to a Slurm ``Weight``
(Slurm gives a job the nodes of the lowest weight first, so the fastest nodes are used first) and a
node feature (``perf_a`` .. ``perf_d``) that a job asks for with ``--constraint=perf_a`` to get
nodes of one speed. Pure: no Slurm call here; ``straggler quarantine hints`` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from straggler.analysis.tiers import CLASSES

WEIGHTS = {"A": 1, "B": 2, "C": 3, "D": 4}  # Slurm's default Weight is 1
FEATURE_PREFIX = "perf_"


def feature(klass: str) -> str:
    return FEATURE_PREFIX + klass.lower()


@dataclass(frozen=True)
class Hint:
    node: str
    perf_class: str
    weight: int
    feature: str
    devices: int  # devices of the node with a class

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "perf_class": self.perf_class,
            "weight": self.weight,
            "feature": self.feature,
            "devices": self.devices,
        }


def node_hints(entries: Iterable[Mapping]) -> list[Hint]:
    """One hint per host from entries with ``host`` and ``perf_class`` (per device, or per device
    and probe: the analysis' device table, the collector's ``/api/v1/gpus``), sorted by host."""
    worst: dict[str, str] = {}
    devices: dict[str, set] = {}
    for e in entries:
        klass = e.get("perf_class")
        if klass not in CLASSES:
            continue
        host = str(e["host"])
        devices.setdefault(host, set()).add(e.get("gpu"))
        worst[host] = max(worst.get(host, klass), klass, key=CLASSES.index)
    return [Hint(h, k, WEIGHTS[k], feature(k), len(devices[h])) for h, k in sorted(worst.items())]


def scontrol_commands(hints: Iterable[Hint], features: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """``scontrol update`` lines. Slurm replaces a node's whole feature list: ``features`` (node ->
    its current features) keeps the node's other features and drops only its old ``perf_*`` one."""
    out = []
    for h in hints:
        keep = [f for f in (features or {}).get(h.node, ()) if f and not f.startswith(FEATURE_PREFIX)]
        feats = ",".join(keep + [h.feature])
        out.append(
            f"scontrol update NodeName={h.node} Weight={h.weight} AvailableFeatures={feats} ActiveFeatures={feats}"
        )
    return out


def slurm_conf(hints: Iterable[Hint]) -> str:
    """A ``slurm.conf`` fragment: each node's ``Weight`` and feature, to merge into its ``NodeName=`` line
    (a job then asks for a class with ``--constraint=perf_a``)."""
    lines = [
        "# straggler placement hints: merge Weight= and the perf_* feature into each node's NodeName= line",
        "# (keep its other Features; jobs pick a class with --constraint=perf_a; lower Weight is used first)",
    ]
    lines += [
        f"NodeName={h.node} Weight={h.weight} Features={h.feature}  # class {h.perf_class}, {h.devices} device(s)"
        for h in hints
    ]
    return "\n".join(lines) + "\n"
