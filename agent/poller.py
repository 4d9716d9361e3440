"""Learns of cluster scans: long-polls ``GET /api/v1/scans/next`` and queues each new scan once.

Every reply is checked first (agent/scanspec.py): the queue holds :class:`ClusterScan` (run it) or
:class:`ScanRefused` with a safe scan id (report it failed); a reply without a safe id is dropped
with one error line, counted under ``straggler_agent_errors_total{source="poll"}``."""

from __future__ import annotations

import logging
import queue
import random
import threading

import httpx

from .scanspec import ScanRefused, parse_scan
from .uploader import auth_headers, client_options

log = logging.getLogger("straggler.agent.poll")


class ScanPoller:
    def __init__(self, settings, host: str, scans: "queue.Queue", metrics=None) -> None:
        self.settings = settings
        self.host = host
        self.scans = scans
        self.metrics = metrics
        self.seen: set[str] = set()
        self.repeated = False  # the last poll answered a scan already queued (its state not yet sent)

    def poll_once(self, client: httpx.Client) -> dict | None:
        wait = self.settings.poll_wait_s
        resp = client.get(
            "/api/v1/scans/next",
            params={"host": self.host, "wait_s": wait},
            timeout=wait + self.settings.http_timeout_s,
        )
        if resp.status_code == 204:
            return None
        resp.raise_for_status()
        reply = resp.json()
        try:
            scan = parse_scan(reply)
            key = scan.scan_id
        except ScanRefused as e:
            scan, key = e, e.scan_id
        if isinstance(scan, ScanRefused) and scan.scan_id is None:  # counted and logged at every offer
            if self.metrics:
                self.metrics.errors.labels("poll").inc()
            log.error("scan from the collector dropped, not run and not reported: %s", scan.reason)
            self.repeated = True  # the collector offers it again at once: wait as for a repeat
            return None
        self.repeated = key in self.seen
        if self.repeated:
            return None
        self.seen.add(key)
        self.scans.put(scan)
        return scan

    def run(self, stop: threading.Event) -> None:
        delay = self.settings.backoff_initial_s
        client: httpx.Client | None = None
        while not stop.is_set():
            try:
                if client is None:  # (re)read the token: a rotated token needs no restart
                    client = httpx.Client(
                        base_url=self.settings.collector_url,
                        headers=auth_headers(self.settings.token_file),
                        **client_options(self.settings),
                    )
                scan = self.poll_once(client)
                delay = self.settings.backoff_initial_s
                if scan is not None:
                    log.info("cluster scan %s starts at %s", scan.scan_id, getattr(scan, "start_at", None))
                elif self.repeated or self.settings.poll_wait_s == 0:
                    # the collector answers at once until this node reports the scan's state
                    stop.wait(min(self.settings.poll_wait_s or 1.0, 5.0))
            except Exception as e:  # noqa: BLE001 - any failure: counted, one line, retried; never a dead thread
                if not isinstance(e, (httpx.HTTPError, OSError, ValueError, KeyError)):
                    e = f"{type(e).__name__}: {e}"  # an unexpected one (a reply of the wrong shape): say what
                if client is not None:
                    client.close()
                    client = None
                if self.metrics:
                    self.metrics.errors.labels("poll").inc()
                log.warning("scan poll failed (%s); retrying in %.1f s", e, delay)
                stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(self.settings.backoff_max_s, delay * 2)
        if client is not None:
            client.close()
