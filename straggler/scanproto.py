"""What every layer says about a scan, said once: its id (the one format and the one check) and the
states a node reports for it. Importing it loads nothing.

A scan id is ``<UTC time>[-<word>...]-<8 hex digits>`` (``20261201T145200Z-node7-retest-1a2b3c4d``):
the time first, so ids sort by when the scan began; the words say whose or what kind (the host of a
local scan, ``retest``); the random part keeps two scans of one second apart. Any id a scan is given
(``--scan-id``, a collector's reply) must match :data:`SCAN_ID`: it becomes a file name in the agent's
spool and a URL path segment.
"""

from __future__ import annotations

import re
import secrets
import time

SCAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TIME_FORMAT = "%Y%m%dT%H%M%SZ"
WORDS_MAX_CHARS = 100  # of the words: the whole id stays within SCAN_ID's 128 characters

# A cluster scan's limits, the collector's (POST /api/v1/scans) and so the agent's (agent/scanspec.py).
MAX_DURATION_S = 3600.0  # a probe's duration_s at most
DEFAULT_START_DELAY_S = 10.0  # a scan's start_at is this far ahead: every node has picked it up
MAX_START_DELAY_S = 3600.0

# A node's state in a cluster scan (``POST /api/v1/scans/{id}/status``); a final state is never left.
NODE_STATES = ("pending", "running", "done", "failed")
FINAL_STATES = ("done", "failed")


def new_scan_id(*words: str, now: float | None = None) -> str:
    """A fresh scan id (the format above); characters a scan id may not hold become ``_``."""
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", w) for w in words if w]
    middle = "-".join(parts)[:WORDS_MAX_CHARS]
    stamp = time.strftime(TIME_FORMAT, time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{middle + '-' if middle else ''}{secrets.token_hex(4)}"


def scan_id_problem(value: object) -> str | None:
    """Why ``value`` cannot be a scan id (a file name in the spool, a URL path segment), else None."""
    if not isinstance(value, str):
        return f"scan_id is not a string ({type(value).__name__})"
    if not SCAN_ID.fullmatch(value):
        return f"scan_id {value[:80]!r} is not 1-128 letters, digits, '.', '_', '-' (not starting with '.' or '-')"
    return None
