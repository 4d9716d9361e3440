"""straggler.verdict: the wording shared by the commands."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from straggler.verdict import whole_hosts


def test_whole_hosts_pairs_entries_by_position_not_by_a_columns_index():
    """`straggler analyze` passes a subset of the device table (Series keeping the table's index)
    with a numpy array of flags: the entries are paired by position, as the loop over zip() did."""
    table = pd.DataFrame(
        {
            "host": ["a", "x", "x", "a", "y"],
            "gpu": ["0", "0", "1", "1", "0"],
            "flagged": [True, True, True, False, True],
        }
    )
    near = table["host"].isin(["x", "y"]).to_numpy(dtype=bool)  # index 1, 2, 4 of the table
    flagged = table["flagged"].to_numpy(dtype=bool)
    assert whole_hosts(table["host"][near], table["gpu"][near], flagged[near]) == [
        "x: all 2 devices flagged (the node, not its devices?)"
    ]
    # every column a Series of its own index: still by position
    hosts = pd.Series(["x", "x"], index=[7, 8])
    assert whole_hosts(hosts, pd.Series(["0", "1"], index=[0, 1]), pd.Series([True, True], index=[3, 4])) == [
        "x: all 2 devices flagged (the node, not its devices?)"
    ]
    assert whole_hosts(hosts, ["0", "1"], np.array([True, False])) == []


def test_whole_hosts_reads_missing_flags_as_not_flagged_without_a_warning():
    """A missing flag (None, NaN, NA: not checked) is not flagged. No FutureWarning on stderr under
    the supported pandas 2.x either (its fillna on object columns warned about downcasting)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines = whole_hosts(["a", "a", "b", "b", "c", "c"], list("010101"), [True, None, True, np.nan, pd.NA, True])
        assert lines == []
        assert whole_hosts(["a", "a"], ["0", "1"], pd.Series([True, 1], dtype=object)) == [
            "a: all 2 devices flagged (the node, not its devices?)"
        ]


def test_whole_hosts_counts_a_device_flagged_on_any_probe_and_needs_two_devices():
    hosts = ["b", "b", "b", "b", "a", "a", "c", "d", "d"]
    gpus = ["0", "0", "1", "1", "0", "1", "0", "0", "1"]
    flagged = [True, False, False, True, True, True, True, True, False]
    # b: each device flagged on one of its two probes; a: both; c: one device only; d: one healthy
    assert whole_hosts(hosts, gpus, flagged) == [
        "a: all 2 devices flagged (the node, not its devices?)",
        "b: all 2 devices flagged (the node, not its devices?)",
    ]
    assert whole_hosts([], [], []) == []
