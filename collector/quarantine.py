"""The quarantine loop: drain a straggler node, retest it, resume it after N clean passes; audit all.

The collector holds the fleet's quarantine state (``quarantine`` table) and its audit
(``quarantine_events``). Every step is recorded with when, why, by which rule and whom, and the
measured values behind it:

- ``drain``: a host is drained through the drain action (``straggler.drain``; ``scontrol`` first),
  asked for by the fleet analysis (rule ``fleet_analysis``), by a gate on the node (``gate``) or by
  hand (``manual``). Automatic drains go through the **circuit breaker**: within
  ``quarantine_window_s`` at most ``quarantine_max_fleet_share`` of the fleet's hosts (and of the
  hosts with one device model) may be drained, never fewer than one host. A drain beyond that is
  ``refused`` (recorded, ``straggler_circuit_breaker_tripped`` 1, a warning logged) and the host left
  in service: many nodes slow at once is a fleet problem (a driver change, a hot room), not many
  stragglers. A drain by hand is never refused.
- ``retest_pass`` / ``retest_fail``: the host's agent retests it when idle and reports each outcome.
  A pass counts towards ``quarantine_resume_passes`` consecutive passes; a fail (a straggler, an
  undecided device, a run that could not measure) starts the count again.
- ``resume``: after the N-th consecutive pass (rule ``hysteresis``), or by hand (``manual``).

With ``quarantine_action = "record"`` every decision is made and audited but no scheduler is touched
(a dry run); with ``"none"`` the loop is off and drain requests are answered 409.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from straggler.drain import ALLOCATED, IDLE, MIXED
from straggler.errors import StragglerError

from .store import Store

log = logging.getLogger("straggler.collector.quarantine")

DRAIN, RETEST_PASS, RETEST_FAIL, RESUME, REFUSED = "drain", "retest_pass", "retest_fail", "resume", "refused"
ACTIONS = (DRAIN, RETEST_PASS, RETEST_FAIL, RESUME, REFUSED)  # the `action` label of the counter
RULE_ANALYSIS, RULE_GATE, RULE_MANUAL, RULE_HYSTERESIS, RULE_RETEST = (
    "fleet_analysis",
    "gate",
    "manual",
    "hysteresis",
    "agent_retest",
)
DRAINED, RESUMED = "drained", "resumed"
OK = "ok"
IN_SERVICE = (IDLE, ALLOCATED, MIXED)  # the drain action's states of a node that takes jobs
REASON_MAX = 200  # of a reason in the audit; the one given to the scheduler is drain_reason's length


class QuarantineOff(Exception):
    """quarantine_action is none: the loop is off."""


class NotQuarantined(Exception):
    """A retest reported for a host straggler has not drained."""


class ActionFailed(Exception):
    """The drain action (scontrol) failed; nothing changed. The message says why."""


@dataclass(frozen=True)
class Decision:
    """What a request did: ``action`` (drain, refused, resume, retest_pass, retest_fail, or
    ``none`` when nothing had to be done), the host's state afterwards, and a one-line ``detail``."""

    host: str
    action: str
    state: str | None
    detail: str
    passes: int = 0

    def to_json(self) -> dict:
        return {
            "host": self.host,
            "action": self.action,
            "state": self.state,
            "detail": self.detail,
            "passes": self.passes,
        }


def analysis_reason(gpu: str, probe: str, ratio: float | None, cause: str | None) -> str:
    """``straggler: gpu3 matmul 0.80x thermal``, worded as the gate words it (``straggler.drain.drain_reason``)."""
    from straggler.drain import drain_reason
    from straggler.finding import Finding

    value = f"{ratio:.2f}x" if isinstance(ratio, (int, float)) and math.isfinite(ratio) else ""
    return drain_reason([Finding(str(gpu), str(probe), value, str(cause or "slow").split(":")[0])])


def _scheduler(action: str):
    """The drain action for ``quarantine_action`` (None for ``record``: decide and audit only)."""
    if action == "scontrol":
        from straggler.drain import ScontrolAction

        return ScontrolAction()
    return None


class Quarantine:
    """The loop's state and decisions over the collector's store. Thread-safe (one lock: the
    breaker's count and the drain it allows are one step)."""

    def __init__(self, store: Store, settings, clock: Callable[[], float] = time.time, scheduler=None) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.enabled = settings.quarantine_action != "none"
        self.scheduler = scheduler if scheduler is not None else _scheduler(settings.quarantine_action)
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(ACTIONS, 0)
        self.last_refused_ts: float | None = None
        self._refused_scans: dict[str, str] = {}  # host -> the scan whose drain the breaker refused
        for action, n in store._reader.execute(
            "SELECT action, COUNT(*) FROM quarantine_events WHERE outcome = ? GROUP BY action", (OK,)
        ):
            if action in self.counts:
                self.counts[action] = n
        row = store._reader.execute("SELECT MAX(ts) FROM quarantine_events WHERE action = ?", (REFUSED,)).fetchone()
        self.last_refused_ts = row[0]

    # -- reads -----------------------------------------------------------------------------

    def nodes(self, state: str | None = DRAINED) -> list[dict]:
        where, params = ("WHERE state = ?", (state,)) if state else ("", ())
        return self.store._rows(
            f"SELECT host, state, since_ts, rule, reason, by, passes, updated_ts FROM quarantine {where} ORDER BY host",
            params,
        )

    def node(self, host: str) -> dict | None:
        rows = self.store._rows(
            "SELECT host, state, since_ts, rule, reason, by, passes, updated_ts FROM quarantine WHERE host = ?", (host,)
        )
        return rows[0] if rows else None

    def events(self, host: str | None = None, limit: int = 1000) -> list[dict]:
        """The audit, newest first (one host's with ``host``)."""
        where, params = ("WHERE host = ?", [host]) if host else ("", [])
        rows = self.store._rows(
            f"SELECT id, ts, host, action, rule, reason, by, outcome, measured FROM "
            f"quarantine_events {where} ORDER BY id DESC LIMIT ?",
            params + [limit],
        )
        for r in rows:
            r["measured"] = json.loads(r["measured"]) if r["measured"] else None
        return rows

    def tripped(self) -> bool:
        """The breaker refused a drain within the last window."""
        last = self.last_refused_ts
        return last is not None and self.clock() - last < self.settings.quarantine_window_s

    def breaker(self) -> dict:
        now = self.clock()
        counted = self._counted_hosts(now)
        fleet = self._fleet_hosts() | counted
        return {
            "tripped": self.tripped(),
            "window_s": self.settings.quarantine_window_s,
            "max_fleet_share": self.settings.quarantine_max_fleet_share,
            "max_model_share": self.settings.quarantine_max_model_share,
            "fleet_hosts": len(fleet),
            "drained_in_window": len(counted),
            "limit": self._limit(self.settings.quarantine_max_fleet_share, len(fleet)),
            "last_refused_ts": self.last_refused_ts,
        }

    def state(self) -> dict:
        """``GET /api/v1/quarantine``: the drained nodes, the breaker, the loop's settings."""
        return {
            "action": self.settings.quarantine_action,
            "enabled": self.enabled,
            "resume_passes": self.settings.quarantine_resume_passes,
            "nodes": self.nodes(),
            "breaker": self.breaker(),
        }

    # -- the breaker -----------------------------------------------------------------------

    @staticmethod
    def _limit(share: float, hosts: int) -> int:
        return max(1, math.floor(share * hosts + 1e-9))

    def _fleet_hosts(self) -> set[str]:
        rows = self.store._reader.execute("SELECT host FROM devices UNION SELECT host FROM agents").fetchall()
        return {r[0] for r in rows}

    def _counted_hosts(self, now: float) -> set[str]:
        """Hosts drained within the window, or drained now (automatically or by hand)."""
        rows = self.store._reader.execute(
            "SELECT host FROM quarantine_events WHERE action = ? AND outcome = ? AND ts >= ? "
            "UNION SELECT host FROM quarantine WHERE state = ?",
            (DRAIN, OK, now - self.settings.quarantine_window_s, DRAINED),
        ).fetchall()
        return {r[0] for r in rows}

    def _models(self, hosts: set[str] | None = None) -> dict[str, set[str]]:
        """model -> hosts with a device of that model."""
        out: dict[str, set[str]] = {}
        for host, model in self.store._reader.execute(
            "SELECT DISTINCT host, model FROM devices WHERE model IS NOT NULL"
        ):
            if hosts is None or host in hosts:
                out.setdefault(model, set()).add(host)
        return out

    def _refusal(self, host: str, now: float) -> str | None:
        """Why the breaker refuses to drain ``host`` now, or None."""
        s = self.settings
        counted = self._counted_hosts(now)
        after = counted | {host}
        fleet = self._fleet_hosts() | after  # a host drained is part of the fleet, results or not
        limit = self._limit(s.quarantine_max_fleet_share, len(fleet))
        window = f"{s.quarantine_window_s:g} s"
        if len(after) > limit:
            return (
                f"circuit breaker: draining {host} would make {len(after)} of {len(fleet)} hosts drained within "
                f"{window}, more than {s.quarantine_max_fleet_share:.0%} of the fleet ({limit})"
            )
        for model, hosts in sorted(self._models().items()):
            if host not in hosts:
                continue
            limit = self._limit(s.quarantine_max_model_share, len(hosts))
            n = len(after & hosts)
            if n > limit:
                return (
                    f"circuit breaker: draining {host} would make {n} of {len(hosts)} hosts with {model} drained "
                    f"within {window}, more than {s.quarantine_max_model_share:.0%} of them ({limit})"
                )
        return None

    # -- writes ----------------------------------------------------------------------------

    def _event(
        self,
        conn,
        now: float,
        host: str,
        action: str,
        rule: str | None,
        reason: str | None,
        by: str | None,
        outcome: str = OK,
        measured: Any = None,
    ) -> None:
        conn.execute(
            "INSERT INTO quarantine_events (ts, host, action, rule, reason, by, outcome, measured) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                now,
                host,
                action,
                rule,
                reason,
                by,
                outcome,
                None if measured is None else json.dumps(measured, default=str),
            ),
        )
        if outcome == OK:
            self.counts[action] += 1

    @staticmethod
    def _mark_scans(conn, host: str) -> None:
        """Remember the host's latest scans and the scans of its retests since it was drained: their
        results never drain it again (by scan id, not by time: the nodes' clocks need not agree with
        the collector's). A retest's rows travel apart from its report (the agent's uploader, with its
        own backoff), so a failed retest's rows may arrive after the passes that resumed the node."""
        scans = {r[0] for r in conn.execute("SELECT DISTINCT last_scan_id FROM devices WHERE host = ?", (host,))}
        for (measured,) in conn.execute(
            "SELECT measured FROM quarantine_events WHERE host = ? AND action IN (?, ?) AND outcome = ? AND id > "
            "(SELECT COALESCE(MAX(id), 0) FROM quarantine_events WHERE host = ? AND action = ? AND outcome = ?)",
            (host, RETEST_PASS, RETEST_FAIL, OK, host, DRAIN, OK),
        ):
            doc = json.loads(measured) if measured else None
            scan_id = doc.get("scan_id") if isinstance(doc, dict) else None
            if isinstance(scan_id, str) and scan_id:
                scans.add(scan_id)
        conn.execute("UPDATE quarantine SET scans = ? WHERE host = ?", (json.dumps(sorted(scans)), host))

    def _record(self, host: str, action: str, rule, reason, by, outcome: str = OK, measured=None) -> None:
        with self.store._transaction() as conn:
            self._event(conn, self.clock(), host, action, rule, reason, by, outcome, measured)

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise QuarantineOff('the quarantine loop is off (quarantine_action = "none"); set it to record or scontrol')

    def drain(
        self, host: str, reason: str, rule: str, by: str | None = None, measured: Any = None, manual: bool = False
    ) -> Decision:
        """Drain ``host`` unless it is drained already or (not ``manual``) the breaker refuses.
        Raises QuarantineOff, ActionFailed (recorded with its reason; nothing changed)."""
        self._require_enabled()
        reason = reason[:REASON_MAX]
        with self._lock, self.store.exclusive("quarantine"):  # one replica decides at a time
            current = self.node(host)
            if current is not None and current["state"] == DRAINED:
                return Decision(
                    host, "none", DRAINED, f"{host} is drained already: {current['reason']}", current["passes"]
                )
            now = self.clock()
            refusal = None if manual else self._refusal(host, now)
            if refusal:
                self._record(host, REFUSED, rule, reason, by, measured={"refused": refusal, "request": measured})
                self.last_refused_ts = now
                log.warning("drain of %s refused (%s): %s", host, reason, refusal)
                return Decision(host, REFUSED, current and current["state"], refusal)
            self._act("drain", host, reason, rule, by, measured)
            with self.store._transaction() as conn:
                conn.execute(
                    "INSERT INTO quarantine (host, state, since_ts, rule, reason, by, passes, updated_ts) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0, ?) ON CONFLICT (host) DO UPDATE SET state = excluded.state, "
                    "since_ts = excluded.since_ts, rule = excluded.rule, reason = excluded.reason, by = excluded.by, "
                    "passes = 0, updated_ts = excluded.updated_ts",
                    (host, DRAINED, now, rule, reason, by, now),
                )
                self._mark_scans(conn, host)
                self._event(conn, now, host, DRAIN, rule, reason, by, measured=measured)
            log.warning("drained %s (%s, rule %s%s)", host, reason, rule, f", by {by}" if by else "")
            return Decision(host, DRAIN, DRAINED, reason)

    def _act(self, what: str, host: str, reason: str, rule, by, measured) -> str | None:
        """Run the drain action; a failure is recorded (outcome ``failed: ...``) and raised. A resume
        the scheduler refuses because the node is in service already (resumed with scontrol by hand)
        is done: returns a note saying so."""
        if self.scheduler is None:
            return None
        try:
            if what == "drain":
                self.scheduler.drain(host, reason)
            else:
                self.scheduler.resume(host)
        except (StragglerError, OSError) as e:  # DrainError: scontrol missing, hung or refused
            if what == "resume":
                try:
                    state = self.scheduler.state(host)
                except (StragglerError, OSError):
                    state = None
                if state in IN_SERVICE:
                    return f"{host} was in service already ({state})"
            why = f"{what} {host} failed: {e}"
            self._record(
                host, DRAIN if what == "drain" else RESUME, rule, reason, by, outcome=f"failed: {e}", measured=measured
            )
            log.error("%s", why)
            raise ActionFailed(why) from None

    def resume(
        self, host: str, reason: str, by: str | None = None, rule: str = RULE_MANUAL, measured: Any = None
    ) -> Decision:
        """Resume ``host`` (by hand: also a host straggler did not drain, e.g. one a prolog drained)."""
        self._require_enabled()
        with self._lock, self.store.exclusive("quarantine"):  # one replica decides at a time
            return self._resume(host, reason[:REASON_MAX], by, rule, measured)

    def _resume(self, host, reason, by, rule, measured) -> Decision:
        note = self._act("resume", host, reason, rule, by, measured)
        if note:
            measured = {**(measured or {}), "note": note}
        now = self.clock()
        with self.store._transaction() as conn:
            conn.execute(
                "UPDATE quarantine SET state = ?, since_ts = ?, rule = ?, reason = ?, by = ?, updated_ts = ? "
                "WHERE host = ?",
                (RESUMED, now, rule, reason, by, now, host),
            )
            self._mark_scans(conn, host)
            self._event(conn, now, host, RESUME, rule, reason, by, measured=measured)
        log.warning("resumed %s (%s, rule %s%s)", host, reason, rule, f", by {by}" if by else "")
        return Decision(host, RESUME, RESUMED, reason)

    def retest(self, host: str, passed: bool, reason: str, measured: Any = None, by: str | None = None) -> Decision:
        """An agent's retest of a drained host. N consecutive passes resume it. Raises NotQuarantined."""
        self._require_enabled()
        need = self.settings.quarantine_resume_passes
        with self._lock, self.store.exclusive("quarantine"):  # one replica decides at a time
            current = self.node(host)
            if current is None or current["state"] != DRAINED:
                raise NotQuarantined(f"{host} is not drained by straggler")
            passes = current["passes"] + 1 if passed else 0
            now = self.clock()
            action = RETEST_PASS if passed else RETEST_FAIL
            detail = f"{reason} (pass {passes} of {need})" if passed else f"{reason} (passes start again)"
            with self.store._transaction() as conn:
                conn.execute("UPDATE quarantine SET passes = ?, updated_ts = ? WHERE host = ?", (passes, now, host))
                self._event(conn, now, host, action, RULE_RETEST, detail, by, measured=measured)
            if passed and passes >= need:
                try:
                    done = self._resume(
                        host,
                        f"straggler: {passes} clean retests",
                        by,
                        RULE_HYSTERESIS,
                        {"passes": passes, "last": measured},
                    )
                except ActionFailed:  # still drained; the next pass tries again
                    return Decision(host, action, DRAINED, detail + "; the resume failed", passes)
                return Decision(host, RESUME, done.state, done.detail, passes)
            return Decision(host, action, DRAINED, detail, passes)

    def from_analysis(self, snap) -> list[Decision]:
        """Drain the hosts the fleet analysis flags (a device of tier ``straggler``) by a scan other
        than those it had at its last quarantine step, worst first, through the breaker."""
        if not (self.enabled and self.settings.quarantine_from_analysis):
            return []
        known = {
            r[0]: (r[1], set(json.loads(r[2] or "[]")), r[3])
            for r in self.store._reader.execute("SELECT host, state, scans, since_ts FROM quarantine")
        }
        worst: dict[str, tuple[float, dict, dict]] = {}
        for g in snap.gpus:
            if g.get("verdict") != "straggler" or g.get("last_ts") is None:
                continue
            state, seen, since = known.get(g["host"], (None, set(), None))
            if state == DRAINED or g.get("last_scan_id") in seen:
                continue  # drained already, or resumed since these results
            if since is not None and (snap.computed_ts is None or snap.computed_ts <= since):
                continue  # an analysis that read the store before the host's last step (a resume meanwhile)
            if self._refused_scans.get(g["host"]) == g.get("last_scan_id"):
                continue  # refused for these results already: one refusal each, not one per analysis
            for p in g["probes"]:
                if p.get("verdict") == "straggler":
                    cost = p.get("cost") or 0.0
                    if g["host"] not in worst or cost > worst[g["host"]][0]:
                        worst[g["host"]] = (cost, g, p)
        out = []
        for host, (cost, g, p) in sorted(worst.items(), key=lambda kv: -kv[1][0]):
            cause = (p.get("causes") or [None])[0]
            device = g["gpu"] if str(g["gpu"]).startswith("cpu") or g.get("index") is None else f"gpu{g['index']}"
            measured = {
                "gpu": g["gpu"],
                "model": g.get("model"),
                "probe": p["probe"],
                "settings": p.get("settings"),
                "ratio": p.get("ratio"),
                "deficit": p.get("deficit"),
                "cost": cost,
                "basis": p.get("basis"),
                "causes": p.get("causes"),
                "scan_id": g.get("last_scan_id"),
            }
            try:
                decision = self.drain(
                    host,
                    analysis_reason(device, p["probe"], p.get("ratio"), cause),
                    RULE_ANALYSIS,
                    by="collector",
                    measured=measured,
                )
            except ActionFailed:
                continue  # recorded; the next analysis tries again
            if decision.action == REFUSED:
                self._refused_scans[host] = g.get("last_scan_id")
            out.append(decision)
        return out


class QuarantineMetrics:
    """``/metrics``: ``straggler_node_quarantined{host}`` (1 per host drained by straggler),
    ``straggler_quarantine_actions_total{action}``, ``straggler_circuit_breaker_tripped``."""

    def __init__(self, quarantine: Quarantine) -> None:
        self.q = quarantine

    def collect(self) -> Iterator:
        nodes = GaugeMetricFamily(
            "straggler_node_quarantined", "1 while the node is drained by straggler.", labels=["host"]
        )
        for n in self.q.nodes():
            nodes.add_metric([n["host"]], 1.0)
        yield nodes
        actions = CounterMetricFamily(
            "straggler_quarantine_actions", "Quarantine steps recorded, by action.", labels=["action"]
        )
        for action in ACTIONS:
            actions.add_metric([action], float(self.q.counts[action]))
        yield actions
        yield GaugeMetricFamily(
            "straggler_circuit_breaker_tripped",
            "1 while the circuit breaker refuses drains (a refusal within the window).",
            value=1.0 if self.q.tripped() else 0.0,
        )
