"""The agent's half of the quarantine loop: learn whether straggler drained this node, retest it when
idle, report each retest to the collector (which resumes the node after N consecutive clean passes).

A thread asks ``GET /api/v1/quarantine/{host}`` every ``quarantine_poll_s`` and sends the queued
retest reports (``POST /api/v1/quarantine/{host}/retest``), retrying with backoff. The retest itself
is the agent's usual probe run (``straggler scan`` in a child: the same probes, with re-measurement
of undecided devices up to ``retest_max_rounds`` rounds); :func:`retest_outcome` reads its result.
A retest passes only when the scan decided every device and found no straggler (exit 0); a
straggler, an undecided device or a run that could not measure is not a clean pass.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading

import httpx

from .uploader import auth_headers

log = logging.getLogger("straggler.agent.quarantine")
DRAINED = "drained"  # the collector's state of a host straggler drained (collector/quarantine.py)


def retest_outcome(run) -> dict:
    """The report of a finished retest run (agent/child.py ``ProbeRun``): ``passed``, ``reason``
    (one line), ``scan_id``, ``measured`` (each device's verdict and per-probe ratio to its peers)."""
    doc = None
    try:
        doc = json.loads(run.stdout_path.read_text())
    except (OSError, ValueError, AttributeError):
        pass
    devices = []
    if isinstance(doc, dict) and isinstance(doc.get("devices"), list):
        for d in doc["devices"]:
            if isinstance(d, dict):
                probes = d.get("probes") if isinstance(d.get("probes"), dict) else {}
                devices.append(
                    {
                        "gpu": d.get("gpu"),
                        "verdict": d.get("verdict"),
                        "ratio": {p: v.get("ratio") for p, v in probes.items() if isinstance(v, dict)},
                    }
                )
    bad = [d for d in devices if d["verdict"] not in ("healthy", "slow")]
    measured = {"returncode": run.returncode, "devices": devices}
    if run.failed:
        return {
            "passed": False,
            "reason": f"retest could not measure: {run.error}"[:300],
            "scan_id": run.scan_id,
            "measured": measured,
        }
    if run.returncode == 0 and devices and not bad:
        return {
            "passed": True,
            "reason": f"clean: {len(devices)} device(s) healthy",
            "scan_id": run.scan_id,
            "measured": measured,
        }
    what = (
        ", ".join(
            f"{d['gpu']} {d['verdict']}"
            + "".join(f" {p} {r:.2f}x" for p, r in d["ratio"].items() if isinstance(r, (int, float)))
            for d in bad[:3]
        )
        or f"exit {run.returncode}, no device verdicts"
    )
    return {"passed": False, "reason": f"not clean: {what}"[:300], "scan_id": run.scan_id, "measured": measured}


class QuarantineWatch:
    """Thread body (``run(stop)``). ``drained`` is True / False once the collector answered, None
    before (unknown: no retest)."""

    def __init__(self, settings, host: str, metrics=None, wake: threading.Event | None = None) -> None:
        self.settings = settings
        self.host = host
        self.metrics = metrics
        self.wake = wake  # set when the state changes (the main loop then looks at once)
        self.drained: bool | None = None
        self.passes = 0
        self.reports: queue.Queue[dict] = queue.Queue()
        self._poke = threading.Event()

    def report(self, outcome: dict) -> None:
        """Queue a retest report; sent by the thread, retried until the collector takes it."""
        self.reports.put(outcome)
        self._poke.set()

    def check_once(self, client: httpx.Client) -> None:
        while True:  # the reports first: the state read after them is current
            try:
                outcome = self.reports.get_nowait()
            except queue.Empty:
                break
            resp = client.post(f"/api/v1/quarantine/{self.host}/retest", json=outcome)
            if resp.status_code == 409:  # not drained (any more): nothing to report
                log.info("retest %s not recorded: %s", outcome.get("scan_id"), _detail(resp))
            elif resp.status_code >= 400 and resp.status_code != 422:
                self.reports.queue.appendleft(outcome)  # kept in order for the next try
                resp.raise_for_status()
            else:
                answer = resp.json() if resp.status_code == 200 else {}
                log.info(
                    "retest %s %s: %s",
                    outcome.get("scan_id"),
                    "passed" if outcome["passed"] else "failed",
                    answer.get("detail") or _detail(resp),
                )
        resp = client.get(f"/api/v1/quarantine/{self.host}", params={"limit": 1})
        if resp.status_code == 404:  # a collector without the quarantine loop: nothing is drained by it
            if self.drained is None:
                log.info("the collector has no quarantine API (an older version): no retests")
            self.drained = False
            return
        resp.raise_for_status()
        node = resp.json().get("node") or {}
        drained = node.get("state") == DRAINED
        if drained != self.drained:
            log.warning(
                "straggler %s this node%s",
                "drained" if drained else "does not hold",
                f": {node.get('reason')}" if drained else " drained",
            )
            if self.wake is not None:
                self.wake.set()
        self.drained, self.passes = drained, int(node.get("passes") or 0)

    def run(self, stop: threading.Event) -> None:
        delay = self.settings.backoff_initial_s
        client: httpx.Client | None = None
        while not stop.is_set():
            try:
                if client is None:
                    client = httpx.Client(
                        base_url=self.settings.collector_url,
                        timeout=self.settings.http_timeout_s,
                        headers=auth_headers(self.settings.token_file),
                    )
                self.check_once(client)
                delay = self.settings.backoff_initial_s
                self._poke.wait(self.settings.quarantine_poll_s)
                self._poke.clear()
            except Exception as e:  # noqa: BLE001 - any failure: counted, one line, retried; never a dead thread
                if client is not None:
                    client.close()
                    client = None
                if self.metrics:
                    self.metrics.errors.labels("poll").inc()
                log.warning("quarantine check failed (%s: %s); retrying in %.1f s", type(e).__name__, e, delay)
                stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(self.settings.backoff_max_s, delay * 2)
        if client is not None:
            client.close()


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail"))
    except (ValueError, AttributeError):
        return resp.text[:200]
