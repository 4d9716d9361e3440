"""The node agent: telemetry ticks, Prometheus export, idle probes in a child process, spool, uploads.

One main thread runs a monotonic, drift-corrected loop: read a snapshot every ``interval_s``, hand it
to the exporter and the idle tracker, start / watch / reap the probe child, ping the systemd
watchdog. Two helper threads talk HTTP (uploads, the cluster-scan long poll); the Prometheus server
has its own. Signals only set flags: SIGTERM/SIGINT stop (probe child killed, its rows spooled, the
spool flushed), SIGHUP reloads the config, SIGUSR1 asks for a probe run now (when idle).
The daemon never imports torch.
"""

from __future__ import annotations

import logging
import queue
import signal
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

from prometheus_client.process_collector import ProcessCollector

from straggler.config import open_sqlite
from straggler.errors import ConfigError
from straggler.probes.backends import open_backend
from straggler.probes.telemetry import NodeSnapshot
from straggler.scanproto import new_scan_id, scan_id_problem

from .child import ProbeRun, read_rows, scan_command
from .exporter import build_registry
from .idle import IdleTracker, busy_reason
from . import orphan
from .jobwatch import WATCH_S, JobWatch
from straggler.sdnotify import Notifier
from .poller import ScanPoller
from .scanspec import ClusterScan, ScanRefused
from .quarantine import QuarantineWatch, retest_outcome
from .settings import RESTART_ONLY, AgentSettings, load_settings, serve_metrics
from .spool import open_spool
from .uploader import Uploader

log = logging.getLogger("straggler.agent")
FINAL_FLUSH_S = 5.0
MISSED_START_S = 30.0  # a cluster scan picked up later than this after its start_at is refused


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        config_path: str | Path | None = None,
        overrides: dict | None = None,
        notifier: Notifier | None = None,
        option_names: dict | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides or {}
        self.option_names = option_names or {}
        self.notifier = notifier or Notifier()
        self.host = settings.node
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._reload = threading.Event()
        self._probe_now = threading.Event()
        self.scans: queue.Queue[ClusterScan | ScanRefused] = queue.Queue()
        self.probe_run: ProbeRun | None = None
        self.job_watch: JobWatch | None = None
        self.snapshot = None
        self.threads: list[threading.Thread] = []
        self.server = None

    # --- signals (flags only; the loop acts) ---
    def request_stop(self, *_):
        self.stop_event.set()
        self._wake.set()

    def request_reload(self, *_):
        self._reload.set()
        self._wake.set()

    def request_probe(self, *_):
        self._probe_now.set()
        self._wake.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        signal.signal(signal.SIGUSR1, self.request_probe)

    # --- start / stop ---
    def start(self) -> None:
        s = self.settings
        opened = open_sqlite(
            "spool_path",
            s.spool_path,  # a one-line error, as --check gives
            lambda p: open_spool(p, s.spool_max_rows, s.spool_max_bytes),
        )
        self.spool, spool_note = opened
        self.workdir = s.spool_path.parent / "agent-scans"
        self.backend = open_backend(s.telemetry)
        self.idle = IdleTracker(s.idle_grace_s, s.idle_util_pct)
        self.registry, self.exporter, self.metrics = build_registry()
        ProcessCollector(registry=self.registry)
        self.spool_error: str | None = None  # why the spool cannot take results now (the node is then busy)
        self._spool_dropped = 0
        if spool_note:
            self._spool_failed("corrupt", spool_note)
            self.spool_error = None  # the new spool works
        self.server = serve_metrics(s, self.registry)
        self.port = self.server.server_port
        self.orphan_busy = self._end_orphan()
        self._spooling(
            "the interrupted scans' states",
            lambda: [
                self.spool.add_status(scan_id, self.host, "failed", "agent restarted during the scan")
                for scan_id in self.spool.scans_in_state("running")
            ],
        )
        self._recover()
        self.uploader = self.poller = self.quarantine = None
        self.next_retest = 0.0  # monotonic
        if s.collector_url:
            self.uploader = Uploader(s, self.spool, self.host, self.metrics)
            self.poller = ScanPoller(s, self.host, self.scans, self.metrics)
            self.quarantine = QuarantineWatch(s, self.host, self.metrics, wake=self._wake)
            for name, target in (
                ("upload", self.uploader.run),
                ("poll", self.poller.run),
                ("quarantine", self.quarantine.run),
            ):
                t = threading.Thread(target=target, args=(self.stop_event,), name=name, daemon=True)
                t.start()
                self.threads.append(t)
        self._spooling("the spool's size", lambda: self.metrics.spooled.set(self.spool.count()))
        log.info(
            "%s; /metrics on http://%s:%d; spool %s; collector %s",
            self.backend.notice,
            s.listen_address,
            self.port,
            s.spool_path,
            s.collector_url or "none (spool only)",
        )

    def shutdown(self) -> None:
        self.notifier.stopping("stopping: aborting probes, flushing the spool")
        if self.probe_run is not None and self.probe_run.running:
            self.probe_run.kill("agent stopped during the probe run")
            self._reap(self.probe_run)
        for t in self.threads:
            t.join(timeout=self.settings.http_timeout_s + 1 if t.name == "upload" else 0.5)
        if self.uploader is not None:
            flushed = self.uploader.flush(FINAL_FLUSH_S)
            log.info("spool %s; %d results left", "flushed" if flushed else "not flushed", self.spool.count())
            self.uploader.close()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.backend.close()
        self.spool.close()

    # --- the loop ---
    def run(self) -> int:
        self.start()
        try:
            self.notifier.ready(f"serving /metrics on {self.settings.listen_address}:{self.port}")
            interval = self.settings.interval_s
            next_tick = time.monotonic()
            next_probe = time.monotonic()  # the first scheduled probe as soon as the node is idle
            next_ping = time.monotonic()
            while not self.stop_event.is_set():
                # cleared before the requests are looked at: one that comes after (a signal between
                # the wait's timeout and a clear after it) wakes the wait below instead of being lost
                # until the next tick
                self._wake.clear()
                now = time.monotonic()
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                    interval = self.settings.interval_s
                if now >= next_tick:
                    self.tick(now)
                    next_tick += interval * max(1, int((now - next_tick) // interval) + 1)
                next_probe = self._probes(time.monotonic(), next_probe)
                if self.notifier.watchdog_s and now >= next_ping:
                    self.notifier.watchdog()
                    next_ping = now + self.notifier.watchdog_s / 2
                waits = [next_tick - time.monotonic()]
                if self.probe_run is not None or not self.scans.empty():
                    waits.append(WATCH_S)
                if self.notifier.watchdog_s:
                    waits.append(next_ping - time.monotonic())
                self._wake.wait(max(0.0, min(waits)))
        finally:
            self.shutdown()
        return 0

    def tick(self, now_mono: float) -> None:
        t0 = time.perf_counter()
        try:
            snap = self.backend.snapshot(self.host)
        except Exception as e:  # a broken backend must not kill the daemon: the node is unknown, so busy
            log.error("telemetry read failed: %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            snap = NodeSnapshot(
                ts=time.time(),
                host=self.host,
                backend=self.backend.name,
                devices=(),
                error=f"telemetry read failed: {type(e).__name__}: {e}",
            )
            self.metrics.telemetry_failures.labels("backend_raised").inc()
        else:
            if snap.error:
                self.metrics.telemetry_failures.labels("backend_error").inc()
        if snap.error:
            self.metrics.errors.labels("telemetry").inc()
        # never the last good snapshot as current: a failed read exports stale devices, and makes
        # the node busy (no probes) until a read succeeds and the grace period passes again
        self.snapshot = snap
        self.exporter.update(snap)
        if self.probe_run is None:  # our own probes are not a job
            self.metrics.idle.set(1.0 if self.idle.update(snap, now_mono) else 0.0)
        self.metrics.ticks.inc()
        self.metrics.tick_seconds.set(time.perf_counter() - t0)

    def reload(self) -> None:
        try:
            new = load_settings(self.config_path, self.overrides, option_names=self.option_names)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            self.notifier.status(f"reload refused: {e}")
            return
        old = self.settings
        waiting = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
        if waiting:
            log.warning("reload: %s changed; ignored until the next restart", ", ".join(waiting))
            new = replace(new, **{name: getattr(old, name) for name in waiting})
        if new.telemetry != old.telemetry:
            self.backend.close()
            self.backend = open_backend(new.telemetry)
        self.idle.grace_s, self.idle.util_pct = new.idle_grace_s, new.idle_util_pct
        for helper in (self.uploader, self.poller, self.quarantine):  # the HTTP threads follow the new config
            if helper is not None:
                helper.settings = new
        self.settings = new
        logging.getLogger("straggler").setLevel(new.log_level.upper())
        log.info("config reloaded")
        self.notifier.status(f"config reloaded; serving /metrics on {new.listen_address}:{self.port}")

    # --- probes ---
    def _probes(self, now: float, next_probe: float) -> float:
        run = self.probe_run
        if run is not None:
            if run.poll() or self._job_started(run):
                self._reap(run)
                self.probe_run = self.job_watch = None
            return next_probe
        while not self.scans.empty():
            scan = self.scans.get_nowait()
            self._start_cluster_scan(scan)
            if self.probe_run is not None:
                return next_probe
        if self._probe_now.is_set():
            self._probe_now.clear()
            reason = self._busy()
            if reason:
                log.warning("probe requested but the node is busy: %s", reason)
            else:
                self._start(self._local_scan_id(), cluster=False)
                return next_probe
        s = self.settings
        if self.quarantine is not None and self.quarantine.drained:  # retests replace the scheduled probes
            if now >= self.next_retest and self.idle.idle(now) and not self._busy():
                self._start(self._local_scan_id("retest"), cluster=False, retest=True)
                self.next_retest = now + s.retest_every_s
            return next_probe
        if s.probe_every_s > 0 and now >= next_probe and self.idle.idle(now) and not self._busy():
            self._start(self._local_scan_id(), cluster=False)
            return now + s.probe_every_s
        return next_probe

    def _job_started(self, run: ProbeRun) -> bool:
        """Abort the probe run when a job appeared on the node (agent/jobwatch.py); True once it ended."""
        reason = self.job_watch.check() if self.job_watch is not None else None
        if reason is None:
            return False
        log.warning("probe run %s: a job started (%s); aborting the probes", run.scan_id, reason)
        run.kill(f"aborted: job started: {reason}", "job_started")
        try:
            run.trim(self.job_watch.appeared_ts)
        except OSError as e:  # never upload what the job disturbed: nothing of this run is kept
            log.error("cannot trim the output of %s (%s); none of its results are kept", run.scan_id, e)
            run.output.unlink(missing_ok=True)
        return True

    def _watch(self, run: ProbeRun) -> JobWatch:
        s = self.settings
        on_cpu = s.probe_device == "cpu" or (s.probe_device == "auto" and self.backend.name == "cpu")
        return JobWatch(
            self.backend,
            run.proc.pid,
            watch_gpus=self.backend.name != "cpu",
            job_cpu_cores=s.job_cpu_cores if on_cpu else 0.0,
        )

    def _busy(self) -> str | None:
        if self.spool_error and not self._spooling("a test write", self.spool.touch):
            return self.spool_error  # no probe whose results could not be spooled
        if self.orphan_busy:
            self.orphan_busy = self._end_orphan()  # tried again: it may have ended meanwhile
            if self.orphan_busy:
                return self.orphan_busy
        if self.snapshot is None:
            return "no telemetry yet"
        return busy_reason(self.snapshot, self.settings.idle_util_pct)

    def _local_scan_id(self, kind: str = "") -> str:
        """A local scan's id: ``straggler.scanproto.new_scan_id`` with this host (and ``kind``)."""
        return new_scan_id(self.host, kind)

    def _start_cluster_scan(self, scan: ClusterScan | ScanRefused) -> None:
        if isinstance(scan, ScanRefused):  # a bad field of a scan with a safe id: reported, not run
            log.warning("cluster scan %s refused: %s", scan.scan_id, scan.reason)
            self._spooling(
                f"the state of scan {scan.scan_id}",
                lambda: self.spool.add_status(scan.scan_id, self.host, "failed", scan.reason),
            )
            self._wake_uploader()
            return
        scan_id = scan.scan_id
        late_s = time.time() - (scan.start_at or time.time())
        busy = self._busy()
        too_long = self.settings.scan_problems(
            len(scan.probes or self.settings.probes), scan.duration_s or self.settings.probe_duration_s
        )
        reason = (
            f"missed the start by {late_s:.0f} s"
            if late_s > MISSED_START_S
            else f"cannot finish: {too_long[0]}"
            if too_long
            else busy and f"node busy: {busy}"
        )
        if reason:
            log.warning("cluster scan %s refused: %s", scan_id, reason)
            self._spooling(
                f"the state of scan {scan_id}", lambda: self.spool.add_status(scan_id, self.host, "failed", reason)
            )
            self._wake_uploader()
            return
        self._start(scan_id, cluster=True, start_at=scan.start_at, probes=scan.probes, duration_s=scan.duration_s)

    def _start(
        self,
        scan_id: str,
        cluster: bool,
        start_at: float | None = None,
        probes=None,
        duration_s: float | None = None,
        retest: bool = False,
    ) -> None:
        s = self.settings
        problem = scan_id_problem(scan_id)
        if problem:  # paths are built from a safe id only
            raise ValueError(problem)
        wait = max(0.0, (start_at or 0.0) - time.time())
        deadline = s.probe_deadline_s + wait
        output = self.workdir / f"{scan_id}.jsonl"
        cmd = scan_command(
            s, scan_id, output, deadline, start_at, probes, duration_s, max_rounds=s.retest_max_rounds if retest else 1
        )
        run = ProbeRun(
            scan_id=scan_id,
            cluster=cluster,
            command=cmd,
            output=output,
            deadline_s=deadline,
            kill_grace_s=s.probe_kill_grace_s,
            retest=retest,
        )
        if cluster and not self._spooling(
            f"the state of scan {scan_id}", lambda: self.spool.add_status(scan_id, self.host, "running") or True
        ):
            return  # no probe whose results could not be spooled
        if cluster:
            self._wake_uploader()
        try:
            run.start(self.workdir)
        except OSError as e:
            run.fail(f"cannot start the probe command: {e}", "start")
            self._reap(run)
            return
        self.probe_run = run
        orphan.record(self.workdir, run.proc.pid, scan_id)
        self.job_watch = self._watch(run)
        self.metrics.probe_runs.inc()
        log.info("probe run %s started (killed after %.0f s): %s", scan_id, deadline + run.kill_grace_s, " ".join(cmd))
        self.notifier.status(f"probing ({scan_id}); serving /metrics on {s.listen_address}:{self.port}")

    def _end_orphan(self) -> str | None:
        """End a probe child a previous agent left running (agent/orphan.py); the reason the node
        stays busy when it cannot be ended."""
        done, busy = orphan.end_orphan(self.workdir, self.settings.probe_kill_grace_s)
        if done:
            log.warning("%s", done)
        if busy:
            log.error("%s: no probe starts until it has ended", busy)
        return busy

    def _recover(self) -> None:
        """Spool what probe runs interrupted by a crash or a kill of the agent had written."""
        for path in sorted(self.workdir.glob("*.jsonl")):
            new = self._spooling(
                f"the results of the interrupted run {path.stem}", lambda: self._add_results(read_rows(path))
            )
            if new is None:
                return  # kept for the next start
            log.warning("recovered %d results of the interrupted probe run %s", new, path.stem)
            for leftover in (path, path.with_suffix(".stderr"), path.with_suffix(".stdout")):
                leftover.unlink(missing_ok=True)

    def _reap(self, run: ProbeRun) -> None:
        def spool_run() -> int:
            new = self._add_results(run.rows())
            if run.cluster:
                self.spool.add_status(run.scan_id, self.host, "failed" if run.failed else "done", run.error)
            return new

        new = self._spooling(f"the results of {run.scan_id} ({run.output} is kept for the next start)", spool_run)
        if new is None:  # e.g. a full disk: the output file stays, spooled at the next start
            orphan.clear(self.workdir)
            self.idle.reset()
            return
        if run.failed:
            self.metrics.probe_failures.labels(run.failure or "exit_status").inc()
            self.metrics.errors.labels("probe").inc()
            dropped = f", {run.dropped} measured after the job appeared dropped" if run.dropped else ""
            log.error("probe run %s failed: %s (%d results kept%s)", run.scan_id, run.error, new, dropped)
        else:
            log.info("probe run %s done: %d results spooled", run.scan_id, new)
        if run.retest and self.quarantine is not None:  # after spooling: its rows reach the collector too
            self.quarantine.report(retest_outcome(run))
        if run.ended_mono is not None:
            self.metrics.probe_seconds.set(run.ended_mono - run.started_mono)
        self._spooling("the spool's size", lambda: self.metrics.spooled.set(self.spool.count()))
        run.cleanup()
        orphan.clear(self.workdir)
        self.idle.reset()
        self._wake_uploader()
        self.notifier.status(f"idle; serving /metrics on {self.settings.listen_address}:{self.port}")

    # --- the spool: a full disk or a broken file is an error line and a state, never a crash ---
    def _spooling(self, what: str, action):
        """``action()``'s result, or None when the spool failed (counted, logged in one line; the
        node is busy until the spool works again)."""
        try:
            result = action()
        except sqlite3.Error as e:
            kind = (
                "full"
                if "full" in str(e)
                else "corrupt"
                if ("malformed" in str(e) or "not a database" in str(e))
                else "other"
            )
            self._spool_failed(kind, f"cannot spool {what}: {type(e).__name__}: {e}")
            return None
        self.spool_error = None
        return result

    def _spool_failed(self, kind: str, message: str) -> None:
        self.metrics.errors.labels("spool").inc()
        self.metrics.spool_errors.labels(kind).inc()
        self.spool_error = f"spool unusable ({kind}): {message}"
        log.error("%s", message)

    def _add_results(self, rows) -> int:
        """Spool rows; results the spool's cap dropped are counted and logged."""
        new = self.spool.add_results(rows, host=self.host)
        dropped, self._spool_dropped = self.spool.dropped - self._spool_dropped, self.spool.dropped
        if dropped:
            self.metrics.spool_dropped.inc(dropped)
            log.warning(
                "spool full (spool_max_rows = %d, spool_max_bytes = %d): dropped the %d oldest results",
                self.settings.spool_max_rows,
                self.settings.spool_max_bytes,
                dropped,
            )
        return new

    def _wake_uploader(self) -> None:
        if self.uploader is not None:
            self.uploader.wake.set()
