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
import json
import logging
import threading
import time
from collections import deque
from typing import Callable

from straggler.scanproto import FINAL_STATES, new_scan_id

from .store import Store

log = logging.getLogger("straggler.collector")


OFFER_FIELDS = ("scan_id", "start_at", "probes", "duration_s", "hosts")


def _offer(scan: dict) -> dict:
    """What an agent is told of a scan."""
    return {k: scan[k] for k in OFFER_FIELDS}


def _wire(offer: dict) -> bytes:
    return json.dumps(offer, separators=(",", ":")).encode()


class NoHosts(Exception):
    """A scan without hosts when no agent has been seen recently."""


def overall_state(nodes: dict[str, str], start_at: float, now: float) -> str:
    states = set(nodes.values())
    if nodes and states <= set(FINAL_STATES):
        return "failed" if "failed" in states else "done"
    if "running" in states or now >= start_at or states & set(FINAL_STATES):
        return "running"
    return "pending"


class ScanBoard:
    KEPT_NEW = 64  # scans remembered for the long polls waiting when they were created

    def __init__(
        self,
        store: Store,
        *,
        agent_seen_s: float,
        offer_grace_s: float,
        run_limit_s: float,
        retention_s: float,
        clock: Callable[[], float] = time.time,
    ):
        """The limits are the collector's settings (``scan_run_limit_s``, ``scan_retention_s``)."""
        self.store = store
        self.agent_seen_s = agent_seen_s
        self.offer_grace_s = offer_grace_s
        self.run_limit_s = run_limit_s
        self.retention_s = retention_s
        self.clock = clock
        self._changed: asyncio.Event | None = None  # replaced (after being set) on every new scan
        self._closing = False
        # the latest scans created, in order: (sequence number, hosts, offer, offer as JSON bytes).
        # A poll that waited learns of a new scan from here, without a query: 3,000 polls woken at
        # once would otherwise queue for the database, and serialize the host list 3,000 times.
        self._seq = 0
        self._new: deque[tuple[int, frozenset, dict, bytes]] = deque(maxlen=self.KEPT_NEW)
        # hosts seen polling, written to the agents table in one transaction at most every
        # SEEN_FLUSH_S (and before a scan picks its hosts), not one write per poll
        self._seen: dict[str, float] = {}
        self._seen_lock = threading.Lock()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Future] = set()

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def create(self, probes: list[str], duration_s: float, hosts: list[str] | None, start_delay_s: float) -> dict:
        """Schedule a scan (from the event loop; the database work runs in a thread). Raises NoHosts."""
        now = self.clock()
        if hosts is None:
            await asyncio.to_thread(self.flush_seen)
            hosts = await asyncio.to_thread(self.store.agents_seen_since, now - self.agent_seen_s)
            if not hosts:
                raise NoHosts(f"no agent polled for scans in the last {self.agent_seen_s:g} s; name the hosts")
        hosts = sorted(set(hosts))
        scan = {
            "scan_id": new_scan_id(now=now),
            "created_ts": now,
            "start_at": now + start_delay_s,
            "probes": list(probes),
            "duration_s": duration_s,
            "hosts": hosts,
        }
        await asyncio.to_thread(self.store.create_scan, scan, now - self.retention_s)
        offer = _offer(scan)
        self._seq += 1
        self._new.append((self._seq, frozenset(hosts), offer, _wire(offer)))
        event, self._changed = self._event(), asyncio.Event()
        event.set()  # wake every long poll
        return offer

    def wire(self, offer: dict) -> bytes:
        """``offer`` as JSON bytes (serialized once per scan created here)."""
        for _, _, known, data in reversed(self._new):
            if known["scan_id"] == offer["scan_id"]:
                return data
        return _wire(offer)

    def close(self) -> None:
        """The service is stopping: answer every long poll now, and wait in none from here on (from
        the event loop). A poll cancelled at the end of the graceful stop would answer 500."""
        self._closing = True
        self._event().set()

    async def next_for(self, host: str, wait_s: float) -> dict | None:
        """The oldest scan ``host`` has not reported on, waiting up to ``wait_s`` for one (not at
        all once :meth:`close` was called)."""
        deadline = time.monotonic() + wait_s
        # taken before the look-up: a scan created after it sets this event and has a later number
        event, seen = self._event(), self._seq
        # in a thread: the write lock may be held by a large ingest, and the loop must not wait
        scan = await asyncio.to_thread(self._seen_and_next, host, self.clock())
        self._flush_later()
        if scan is not None:
            return _offer(scan)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                return None
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return None
            event = self._event()
            # the scans created while this poll waited (all of them, unless more than KEPT_NEW were:
            # then the database says) name their hosts, and this host has reported on none of them
            if self._new and self._new[0][0] > seen + 1:
                scan = await asyncio.to_thread(self._seen_and_next, host, self.clock())
                self._flush_later()
                return _offer(scan) if scan is not None else None
            for seq, hosts, offer, _ in self._new:
                if seq > seen and host in hosts:
                    return offer
            seen = self._seq

    SEEN_FLUSH_S = 1.0

    def _seen_and_next(self, host: str, now: float) -> dict | None:
        with self._seen_lock:
            self._seen[host] = max(now, self._seen.get(host, now))
        return self.store.next_scan(host, now - self.offer_grace_s)

    def _flush_later(self) -> None:
        """Flush the hosts seen within SEEN_FLUSH_S (from the event loop; one flush pending at a time)."""
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(self.SEEN_FLUSH_S, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_handle = None
        task = asyncio.ensure_future(asyncio.to_thread(self.flush_seen))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    def flush_seen(self) -> None:
        """Write the hosts seen polling since the last flush (from a worker thread). A write that
        fails keeps them for the next flush."""
        with self._seen_lock:
            seen, self._seen = self._seen, {}
        if not seen:
            return
        try:
            self.store.touch_agents(seen)
        except self.store.errors as e:
            log.warning("could not record %d agents seen polling (kept for the next try): %s", len(seen), e)
            with self._seen_lock:
                for host, ts in seen.items():
                    self._seen[host] = max(ts, self._seen.get(host, ts))

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
            "scan_id": scan["scan_id"],
            "start_at": scan["start_at"],
            "probes": scan["probes"],
            "duration_s": scan["duration_s"],
            "hosts": scan["hosts"],
            "state": overall_state(nodes, scan["start_at"], now),
            "nodes": nodes,
            "errors": errors,
            "results": scan["results"],
        }

    def report(self, scan_id: str, host: str, state: str, error: str | None) -> bool:
        return self.store.set_node_state(scan_id, host, state, error, self.clock())
