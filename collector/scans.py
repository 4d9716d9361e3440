"""Cluster scans: scheduled by a client, learnt by agents through a long poll, tracked per node.

A scan names its hosts when it is created (a request without hosts takes every agent seen within
``agent_seen_s``) and a wall-clock ``start_at`` a few seconds ahead, so that every node starts its
probes at the same instant. Each node moves pending -> running -> done | failed; a node still
pending once the scan is no longer offered to it (``scan_offer_grace_s`` after ``start_at``) missed
it and is shown as failed; so is a node still running ``scan_run_limit_s`` after ``start_at`` (its
agent died mid-scan).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Callable

from .client import FINAL_STATES
from .store import Store


class NoHosts(Exception):
    """A scan without hosts when no agent has been seen recently."""


def new_scan_id(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(4)


def overall_state(nodes: dict[str, str], start_at: float, now: float) -> str:
    states = set(nodes.values())
    if nodes and states <= set(FINAL_STATES):
        return "failed" if "failed" in states else "done"
    if "running" in states or now >= start_at or states & set(FINAL_STATES):
        return "running"
    return "pending"


class ScanBoard:
    def __init__(self, store: Store, *, agent_seen_s: float, offer_grace_s: float,
                 run_limit_s: float = 900.0, clock: Callable[[], float] = time.time):
        self.store = store
        self.agent_seen_s = agent_seen_s
        self.offer_grace_s = offer_grace_s
        self.run_limit_s = run_limit_s
        self.clock = clock
        self._changed: asyncio.Event | None = None  # replaced (after being set) on every new scan
        self._closing = False

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def create(self, probes: list[str], duration_s: float, hosts: list[str] | None, start_delay_s: float) -> dict:
        """Schedule a scan (from the event loop; the database work runs in a thread). Raises NoHosts."""
        now = self.clock()
        if hosts is None:
            hosts = await asyncio.to_thread(self.store.agents_seen_since, now - self.agent_seen_s)
            if not hosts:
                raise NoHosts(f"no agent polled for scans in the last {self.agent_seen_s:g} s; name the hosts")
        hosts = sorted(set(hosts))
        scan = {"scan_id": new_scan_id(now), "created_ts": now, "start_at": now + start_delay_s,
                "probes": list(probes), "duration_s": duration_s, "hosts": hosts}
        await asyncio.to_thread(self.store.create_scan, scan)
        event, self._changed = self._event(), asyncio.Event()
        event.set()  # wake every long poll
        return {k: scan[k] for k in ("scan_id", "start_at", "probes", "duration_s", "hosts")}

    def close(self) -> None:
        """The service is stopping: answer every long poll now, and wait in none from here on (from
        the event loop). A poll cancelled at the end of the graceful stop would answer 500."""
        self._closing = True
        self._event().set()

    async def next_for(self, host: str, wait_s: float) -> dict | None:
        """The oldest scan ``host`` has not reported on, waiting up to ``wait_s`` for one (not at
        all once :meth:`close` was called)."""
        deadline = time.monotonic() + wait_s
        while True:
            event = self._event()  # taken before the look-up: a scan created after it sets this event
            now = self.clock()
            # in a thread: the write lock may be held by a large ingest, and the loop must not wait
            scan = await asyncio.to_thread(self._seen_and_next, host, now)
            remaining = deadline - time.monotonic()
            if scan is not None or remaining <= 0 or self._closing:
                return scan and {k: scan[k] for k in ("scan_id", "start_at", "probes", "duration_s", "hosts")}
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _seen_and_next(self, host: str, now: float) -> dict | None:
        self.store.touch_agent(host, now)
        return self.store.next_scan(host, now - self.offer_grace_s)

    def view(self, scan_id: str) -> dict | None:
        scan = self.store.get_scan(scan_id)
        return None if scan is None else self._view_of(scan, self.clock())

    def recent(self, limit: int) -> list[dict]:
        """The ``limit`` newest scans, newest first, each as :meth:`view` shows it."""
        now = self.clock()
        return [self._view_of(scan, now) for scan in self.store.list_scans(limit)]

    def _view_of(self, scan: dict, now: float) -> dict:
        nodes, errors = dict(scan["nodes"]), dict(scan["errors"])
        if now > scan["start_at"] + self.offer_grace_s:  # no longer offered: a silent node missed it
            for host, state in nodes.items():
                if state == "pending":
                    nodes[host] = "failed"
                    errors[host] = f"did not pick up the scan within {self.offer_grace_s:g} s of its start"
        if now > scan["start_at"] + self.run_limit_s:  # an agent that died mid-scan reports nothing more
            for host, state in nodes.items():
                if state == "running":
                    nodes[host] = "failed"
                    errors[host] = f"still running {self.run_limit_s:g} s after the scan's start: no result came"
        return {
            "scan_id": scan["scan_id"], "start_at": scan["start_at"], "probes": scan["probes"],
            "duration_s": scan["duration_s"], "hosts": scan["hosts"],
            "state": overall_state(nodes, scan["start_at"], now),
            "nodes": nodes, "errors": errors, "results": scan["results"],
        }

    def report(self, scan_id: str, host: str, state: str, error: str | None) -> bool:
        return self.store.set_node_state(scan_id, host, state, error, self.clock())
