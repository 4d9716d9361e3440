"""The collector's configuration: defaults < TOML file < ``STRAGGLER_COLLECTOR_*`` < flags.

The bearer token is never a config-file key: it comes from ``token_file`` (under systemd, a
``LoadCredential=`` file) or from the ``STRAGGLER_COLLECTOR_TOKEN`` environment variable.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from straggler import config
from straggler.errors import ConfigError, InputError
from straggler.token import read_token

DEFAULT_CONFIG = Path("/etc/straggler/collector.toml")
ENV_PREFIX = "STRAGGLER_COLLECTOR_"
TOKEN_ENV = "STRAGGLER_COLLECTOR_TOKEN"
DEFAULT_PORT = 9402  # the agent exports on 9401
QUARANTINE_ACTIONS = ("none", "record", "scontrol")


@dataclass(frozen=True)
class CollectorSettings:
    address: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # an SQLite file, or a postgresql://USER@HOST:PORT/DATABASE URL (docs/collector.md "PostgreSQL")
    db_path: str = "/var/lib/straggler/collector.db"
    token_file: Path | None = None
    max_request_bytes: int = 32 * 1024 * 1024
    max_batch_rows: int = 100_000
    # fleet analysis: recomputed this long after the last ingest (debounce), at most this late
    analysis_debounce_s: float = 2.0
    analysis_max_delay_s: float = 30.0
    history_scans: int = 20  # earlier scans per device fed to the analysis as history
    history_limit: int = 1000  # rows returned by /api/v1/gpus/{uuid}/history by default
    # cluster scans
    agent_seen_s: float = 120.0  # "every agent seen recently" for a scan without a host list
    max_wait_s: float = 60.0  # longest long poll on /api/v1/scans/next
    scan_offer_grace_s: float = 30.0  # a scan is still offered this long after its start_at
    scan_run_limit_s: float = 900.0  # a node still running this long after start_at is shown failed
    # the quarantine loop (collector/quarantine.py, docs/collector.md "Quarantine")
    quarantine_action: str = "none"  # none (off) | record (decide and audit, touch no scheduler) | scontrol
    quarantine_from_analysis: bool = True  # drain hosts the fleet analysis flags (through the breaker)
    quarantine_resume_passes: int = 3  # consecutive clean retests before a drained node resumes
    quarantine_window_s: float = 3600.0  # the circuit breaker's window
    quarantine_max_fleet_share: float = 0.1  # at most this share of the fleet's hosts drained per window
    quarantine_max_model_share: float = 0.1  # ... and of the hosts with one device model
    log_level: str = "info"
    # hostile clients (docs/collector.md "Hostile clients")
    header_timeout_s: float = 10.0  # a request's head must arrive within this (0: no limit)
    body_timeout_s: float = 60.0  # and its body within this after the head (0: no limit)
    max_connections_per_client: int = 64  # per client address (0: no cap); raise it behind a proxy
    open_reads: bool = False  # true: the fleet view (GET /api/v1/gpus...) needs no token
    # results that lie about time: rows dated further ahead of the collector's clock are refused
    max_clock_skew_s: float = 300.0
    scan_retention_s: float = 30 * 86400.0  # scans (not their results) older than this are pruned
    result_retention_s: float = 30 * 86400.0  # raw results received longer ago are pruned (collector/retention.py)
    summary_retention_s: float = 365 * 86400.0  # per-scan summaries (the history) of older scans too (<= a year)

    def problems(self) -> list[str]:
        out = []
        from .db import is_url, url_problem

        if is_url(self.db_path) and url_problem(self.db_path):
            out.append(f"db_path: {url_problem(self.db_path)}")
        elif not str(self.db_path):
            out.append("db_path: must be set (an SQLite file or a postgresql:// URL)")
        if not 0 <= self.port <= 65535:
            out.append(f"port: {self.port} is not a TCP port (0-65535)")
        if self.max_request_bytes < 1024:
            out.append("max_request_bytes: must be >= 1024")
        if self.max_batch_rows < 1:
            out.append("max_batch_rows: must be >= 1")
        for name in ("analysis_debounce_s", "agent_seen_s", "scan_offer_grace_s"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0")
        for name in ("header_timeout_s", "body_timeout_s", "max_connections_per_client"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0 (0: no limit)")
        for name in (
            "analysis_max_delay_s",
            "max_wait_s",
            "scan_run_limit_s",
            "max_clock_skew_s",
            "scan_retention_s",
            "result_retention_s",
            "summary_retention_s",
        ):
            if getattr(self, name) <= 0:
                out.append(f"{name}: must be > 0")
        if self.history_scans < 0 or self.history_limit < 1:
            out.append("history_scans must be >= 0 and history_limit >= 1")
        if self.quarantine_action not in QUARANTINE_ACTIONS:
            out.append(f"quarantine_action: {self.quarantine_action!r} is not one of {', '.join(QUARANTINE_ACTIONS)}")
        if self.quarantine_action == "scontrol" and shutil.which("scontrol") is None:
            out.append("quarantine_action: scontrol is not on the PATH (install slurm-client, or use record)")
        if self.quarantine_resume_passes < 1:
            out.append("quarantine_resume_passes: must be >= 1")
        if self.quarantine_window_s <= 0:
            out.append("quarantine_window_s: must be > 0")
        for name in ("quarantine_max_fleet_share", "quarantine_max_model_share"):
            if not 0 < getattr(self, name) <= 1:
                out.append(f"{name}: must be a share in (0, 1]")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            out.append(f"log_level: {self.log_level!r} is not one of debug, info, warning, error")
        return out


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    option_names: Mapping[str, str] | None = None,
) -> CollectorSettings:
    """Settings from ``path`` (default /etc/straggler/collector.toml when it exists; a path given
    explicitly must exist), the environment and flags. Raises ConfigError listing every problem."""
    explicit = path is not None
    return config.load(
        CollectorSettings,
        path if explicit else DEFAULT_CONFIG,
        env_prefix=ENV_PREFIX,
        env=env,
        overrides=overrides,
        required_file=explicit,
        option_names=option_names,
    )


def check_start(settings: CollectorSettings) -> None:
    """What the start would refuse beyond the settings and the token, tried for real the way the
    start does it: open (or create) the database, bind the address; then undo both. ``straggler
    collector`` runs it before ``--check`` prints and before serving. Run while the collector itself
    is running, it reports the collector's own port as in use."""
    from .db import is_url
    from .listen import bind
    from .schema import LATEST
    from .store import Store

    if is_url(settings.db_path):
        from .store import check_postgres

        check_postgres("db_path", settings.db_path)
    else:
        config.check_sqlite("db_path", Path(settings.db_path), Store, latest_version=LATEST)
    bind(settings.address, settings.port).close()


def scan_problem(settings: CollectorSettings, n_probes: int, duration_s: float) -> str | None:
    """A scan request that would still be running at ``scan_run_limit_s`` (and shown failed)."""
    from straggler.probes.budget import budget_problem

    return budget_problem(n_probes, duration_s, settings.scan_run_limit_s, "the collector's scan_run_limit_s")


def load_token(settings: CollectorSettings, env: Mapping[str, str] | None = None) -> str:
    """The bearer token agents and clients must send. ConfigError when there is none."""
    env = os.environ if env is None else env
    if settings.token_file is not None:
        try:
            token = read_token(settings.token_file, "token_file")
        except InputError as e:
            raise ConfigError([str(e)]) from None
        source = f"token_file {settings.token_file}"
    elif env.get(TOKEN_ENV):
        token, source = env[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        raise ConfigError([f"no token: set token_file (--token-file) or {TOKEN_ENV}"])
    if len(token) < 16:
        raise ConfigError([f"{source}: the token is shorter than 16 characters"])
    return token
