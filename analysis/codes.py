"""The engine's integer codes, made once per analysis and passed whole, by name.

Each step of the engine reads the same few code arrays: which device each sample row belongs to,
which peer group and host each device belongs to, each device's current scan. Passed one by one
and by position, two of them swapped (a host code where a group code belongs, both integer arrays)
would give wrong verdicts without an error; in one frozen object each is read by its name, and
the object checks on creation that every array has the length and the range its name says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Codes:
    row_dev: np.ndarray  # device (0..n_dev-1) of each sample row of the current scan
    n_dev: int
    group: np.ndarray  # peer group (0..n_group-1) of each device
    n_group: int
    host: np.ndarray  # host (0..n_host-1) of each device
    n_host: int
    cur_rank: np.ndarray  # scan rank of each device's current scan

    def __post_init__(self) -> None:
        per_dev = {"group": self.group, "host": self.host, "cur_rank": self.cur_rank}
        _check(per_dev, self.n_dev, "devices")
        _in_range("row_dev", self.row_dev, self.n_dev)
        _in_range("group", self.group, self.n_group)
        _in_range("host", self.host, self.n_host)


@dataclass(frozen=True)
class PastScans:
    """One entry per (current device, past scan): its history rows, each device's samples of one
    earlier scan estimated like the current scan's (``value``: transients removed) and their
    plain sample ``median``."""

    dev: np.ndarray  # device (0..n_dev-1 of the Codes)
    rank: np.ndarray  # scan rank
    value: np.ndarray
    median: np.ndarray

    def __post_init__(self) -> None:
        _check({"rank": self.rank, "value": self.value, "median": self.median}, len(self.dev), "entries")


def _check(arrays: dict, n: int, what: str) -> None:
    for name, a in arrays.items():
        if len(a) != n:
            raise ValueError(f"{name}: {len(a)} entries, {n} {what} expected")


def _in_range(name: str, a: np.ndarray, n: int) -> None:
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name}: integer codes expected, not {a.dtype}")
    if len(a) and (int(a.min()) < 0 or int(a.max()) >= n):
        raise ValueError(f"{name}: codes outside 0..{n - 1}")
