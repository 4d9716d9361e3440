"""The agent's configuration: defaults < /etc/straggler/agent.toml < STRAGGLER_AGENT_* < flags."""

from __future__ import annotations

import errno
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from straggler.config import check_sqlite, load
from straggler.errors import ConfigError, InputError

DEFAULT_CONFIG = Path("/etc/straggler/agent.toml")
ENV_PREFIX = "STRAGGLER_AGENT_"
DEFAULT_PORT = 9401  # beside dcgm-exporter (9400) and the collector (9402)


@dataclass(frozen=True)
class AgentSettings:
    host: str = ""  # the name this node reports as; "" = the machine's hostname
    listen_address: str = "127.0.0.1"  # /metrics bind address (loopback unless told otherwise)
    listen_port: int = DEFAULT_PORT
    telemetry: str = "auto"  # auto | nvml | cpu | fake:<scenario>
    interval_s: float = 15.0  # telemetry tick
    collector_url: str | None = None  # e.g. http://collector:9402; None = spool only
    token_file: Path | None = None  # bearer token for the collector
    ca_file: Path | None = None  # CA bundle (PEM) to verify an https:// collector with; None = the system's CAs
    spool_path: Path = Path("/var/lib/straggler-agent/spool.sqlite")
    spool_max_rows: int = 1_000_000  # past this many results waiting, the oldest are dropped (counted)
    spool_max_bytes: int = 1 << 30  # likewise past this much row data (1 GiB)
    upload_batch: int = (
        1000  # the collector ingests >= 20,000 results/s from batches of 1,000 (benchmarks/collector_ingest.py)
    )
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    http_timeout_s: float = 10.0
    poll_wait_s: float = 30.0  # long poll of GET /api/v1/scans/next
    probes: tuple[str, ...] = ("matmul", "membw")
    probe_duration_s: float = 30.0
    probe_device: str = "auto"  # auto | cpu | cuda
    probe_every_s: float = 6 * 3600.0  # scheduled probes when idle; 0 = only on demand / cluster scans
    probe_deadline_s: float = 600.0  # the scan's own --deadline (plus any wait for start_at)
    probe_kill_grace_s: float = 10.0  # the agent kills the child this long after its deadline
    probe_command: tuple[str, ...] = ()  # the scan command; () = this Python's `-m straggler scan`
    idle_grace_s: float = 300.0  # devices must be idle this long before a scheduled probe
    idle_util_pct: float = 5.0  # at or below this utilization a device counts as idle
    job_cpu_cores: float = (
        0.25  # CPU probes: processes outside the probe using more cores than this = a job; 0 = not watched
    )
    # the quarantine loop (agent/quarantine.py): a node straggler drained is retested when idle
    quarantine_poll_s: float = 60.0  # how often the agent asks the collector whether it is drained
    retest_every_s: float = 900.0  # at most one retest this often (when idle)
    retest_max_rounds: int = 3  # a retest re-measures undecided devices up to this many rounds
    log_level: str = "info"

    def problems(self) -> list[str]:
        out = []
        positive = (
            "interval_s",
            "upload_batch",
            "spool_max_rows",
            "spool_max_bytes",
            "backoff_initial_s",
            "backoff_max_s",
            "http_timeout_s",
            "probe_duration_s",
            "probe_deadline_s",
            "quarantine_poll_s",
            "retest_every_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                out.append(f"{name}: must be > 0")
        for name in ("poll_wait_s", "probe_every_s", "idle_grace_s", "probe_kill_grace_s", "job_cpu_cores"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0")
        if self.retest_max_rounds < 1:
            out.append("retest_max_rounds: must be >= 1")
        if not 0 <= self.listen_port <= 65535:
            out.append("listen_port: must be 0..65535")
        if not 0 <= self.idle_util_pct <= 100:
            out.append("idle_util_pct: must be 0..100")
        if self.probe_device not in ("auto", "cpu", "cuda"):
            out.append(f"probe_device: {self.probe_device!r} is not auto, cpu or cuda")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            out.append(f"log_level: {self.log_level!r} is not debug, info, warning or error")
        if self.collector_url and not self.collector_url.startswith(("http://", "https://")):
            out.append(f"collector_url: {self.collector_url!r} is not an http(s) URL")
        if self.collector_url and self.token_file is None:
            out.append("token_file: required with collector_url (the collector needs a bearer token)")
        elif self.token_file is not None and self.collector_url and not self.token_file.is_file():
            out.append(f"token_file: {self.token_file} is not a readable file")
        elif self.token_file is not None and self.collector_url:
            from .uploader import token_problem

            problem = token_problem(self.token_file)
            if problem:
                out.append(problem)
        if self.ca_file is not None:
            problem = ca_file_problem(self.ca_file)
            if problem:
                out.append(problem)
        if not self.probes:
            out.append("probes: give at least one probe")
        else:
            from straggler.probes.devices import parse_probes

            try:
                parse_probes(self.probes)
            except InputError as e:
                out.append(f"probes: {e}")
            else:
                out.extend(self.scan_problems(len(self.probes), self.probe_duration_s))
        from straggler.probes.backends import spec_problem

        problem = spec_problem(self.telemetry)
        if problem:
            out.append(f"telemetry: {problem}")
        return out

    def scan_problems(self, n_probes: int, duration_s: float) -> list[str]:
        """A scan this agent would kill at ``probe_deadline_s`` before it can finish. What a custom
        ``probe_command`` needs is not known here: it is not checked."""
        if self.probe_deadline_s <= 0 or duration_s <= 0 or self.probe_command:
            return []
        from straggler.probes.budget import budget_problem

        problem = budget_problem(n_probes, duration_s, self.probe_deadline_s, "probe_deadline_s")
        return [problem] if problem else []

    @property
    def node(self) -> str:
        return self.host or socket.gethostname()

    @property
    def scan_base_command(self) -> list[str]:
        """The probe command the agent runs (before its per-scan arguments)."""
        return list(self.probe_command) or [sys.executable, "-m", "straggler", "scan"]

    def effective(self) -> "AgentSettings":
        """These settings as the start uses them (what ``--check`` prints): the resolved node name,
        the probe command that will run."""
        return replace(self, host=self.node, probe_command=tuple(self.scan_base_command))


def ca_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot verify an https:// collector (missing, no PEM certificate), else None."""
    import ssl

    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError, ValueError) as e:
        return f"ca_file: {path} is not a readable PEM CA bundle ({e})"
    return None


RESTART_ONLY = ("host", "listen_address", "listen_port", "spool_path", "collector_url")  # a reload keeps these


def serve_metrics(settings: AgentSettings, registry):
    """The /metrics HTTP server (serving from its own thread), or a one-line InputError when the
    address cannot be bound. The start and ``--check`` both bind through here."""
    from .metrics_server import start_metrics_server

    try:
        server = start_metrics_server(settings.listen_port, settings.listen_address, registry)
    except OSError as e:
        if not isinstance(e, socket.gaierror) and e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        why = (
            "address already in use (another agent, or another service, listens there)"
            if e.errno == errno.EADDRINUSE
            else e.strerror or str(e)
        )
        raise InputError(
            f"cannot serve /metrics on {settings.listen_address}:{settings.listen_port}: {why}; "
            "stop it or choose --listen-port / listen_port"
        ) from None
    return server


def check_start(settings: AgentSettings) -> None:
    """What the start would refuse beyond the settings themselves, tried for real the way the start
    does it: open (or create) the spool, bind the /metrics address; then undo both. ``straggler
    agent`` runs it before ``--check`` prints and before the daemon starts. Run while the agent
    itself is running, it reports the agent's own port as in use."""
    from prometheus_client import CollectorRegistry

    from .spool import Spool

    try:
        check_sqlite("spool_path", settings.spool_path, Spool)
    except ConfigError as e:
        if not any(w in str(e) for w in ("file is not a database", "malformed")):
            raise
        # the start moves a corrupt spool aside and starts a new one (agent/spool.py open_spool)
        print(f"straggler: warning: {e}; the start will move it aside and start a new spool", file=sys.stderr)
    server = serve_metrics(settings, CollectorRegistry())
    server.shutdown()
    server.server_close()


def load_settings(
    path: str | Path | None = None, overrides: dict | None = None, env=None, option_names: dict | None = None
) -> AgentSettings:
    """Validated settings; an explicitly given file must exist, the default one may not."""
    explicit = path is not None
    if not explicit and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load(
        AgentSettings,
        path,
        env_prefix=ENV_PREFIX,
        env=env,
        overrides=overrides,
        required_file=explicit,
        option_names=option_names,
    )
