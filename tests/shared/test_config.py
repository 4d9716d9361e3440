import dataclasses
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from straggler import config
from straggler.errors import ConfigError


@dataclass(frozen=True)
class Cfg:
    interval_s: float = 15.0
    port: int = 9401
    address: str = "127.0.0.1"
    token_file: Path | None = None
    probes: tuple[str, ...] = ("matmul", "membw")
    enabled: bool = True

    def problems(self):
        return [] if self.interval_s > 0 else ["interval_s: must be > 0"]


def test_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('interval_s = 5\nport = 1000\nprobes = ["matmul"]\n')
    cfg = config.load(
        Cfg,
        f,
        env_prefix="X_",
        env={"X_PORT": "2000", "X_ENABLED": "no"},
        overrides={"address": "0.0.0.0", "token_file": None},
    )
    assert cfg == Cfg(interval_s=5.0, port=2000, address="0.0.0.0", probes=("matmul",), enabled=False)


def test_every_problem_listed_at_once(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('interval_s = -1\nport = "x"\nbogus = 1\n')
    with pytest.raises(ConfigError) as e:
        config.load(Cfg, f, env_prefix="X_", env={"X_ENABLED": "maybe"})
    msg = str(e.value)
    assert "port: expected an integer" in msg and "unknown key 'bogus'" in msg
    assert "X_ENABLED: expected true or false" in msg


def test_range_check_and_bad_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("interval_s = 0\n")
    with pytest.raises(ConfigError, match="must be > 0"):
        config.load(Cfg, f)
    f.write_text("interval_s = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(Cfg, f)
    with pytest.raises(ConfigError, match="file not found"):
        config.load(Cfg, tmp_path / "none.toml", required_file=True)


def test_render_for_check():
    cfg = Cfg(token_file=Path("/t"))
    assert "token_file = '/t'" in config.render(cfg) and "probes = ['matmul', 'membw']" in config.render(cfg)
    import json

    assert json.loads(config.render(cfg, as_json=True))["probes"] == ["matmul", "membw"]


# --- `--check` fails exactly when the start would (the same validation code) --------------------


def _cli(*args, env=None, timeout=60):
    import os

    return subprocess.run(
        [sys.executable, "-m", "straggler", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _one_line_error(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("straggler: error: "), out
    return lines[0]


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('probes = ["matmul", "membww"]\n', "probes: unknown probe 'membww'"),
        ('telemetry = "gpu"\n', "telemetry: unknown telemetry backend 'gpu'"),
        ('telemetry = "fake:no_such_scenario"\n', "no such telemetry fixture"),
        (
            "probe_deadline_s = 300\nprobe_duration_s = 60\n",
            "2 probe(s) at 60 s need 560 s, more than probe_deadline_s = 300 s",
        ),
    ],
)
def test_agent_check_fails_exactly_when_the_start_fails(tmp_path, toml, expected):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml + f'spool_path = "{tmp_path / "spool.sqlite"}"\nlisten_port = 0\n')
    checked = _one_line_error(_cli("agent", "--config", str(cfg), "--check"))
    assert expected in checked
    started = _one_line_error(_cli("agent", "--config", str(cfg)))  # refused before anything starts
    assert started == checked
    assert not (tmp_path / "spool.sqlite").exists()


def _unopenable(tmp_path, kind: str):
    if kind == "not a database":
        path = tmp_path / "garbage.db"
        path.write_bytes(b"this is not an SQLite file\n" * 100)
        return path
    (tmp_path / "plainfile").write_text("x")
    return tmp_path / "plainfile" / "c.db"  # its "directory" is a file


@pytest.mark.parametrize(
    "component, kind, expected",
    [
        ("collector", "not a database", "cannot be opened as an SQLite database"),
        # the agent moves a corrupt spool aside and starts (test_agent_spool.py): no restart loop on a node
        ("agent", "parent is a file", "is not a directory"),
        ("collector", "parent is a file", "is not a directory"),
    ],
)
def test_a_database_that_cannot_be_opened_fails_check_and_start_alike(tmp_path, component, kind, expected):
    path = _unopenable(tmp_path, kind)
    if component == "agent":
        args, key = ["agent", "--spool", str(path), "--listen-port", "0"], "spool_path"
    else:
        args, key = ["collector", "--db", str(path), "--port", "0"], "db_path"
    env = {"STRAGGLER_COLLECTOR_TOKEN": "0123456789abcdef0123"}
    checked = _one_line_error(_cli(*args, "--check", env=env))
    assert f"{key}: " in checked and expected in checked and str(path) in checked
    assert _one_line_error(_cli(*args, env=env, timeout=120)) == checked


def test_cluster_scan_client_refuses_a_deadline_the_scan_cannot_meet(tmp_path):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123")
    # refused before the collector is contacted: nothing listens on this URL
    out = _cli(
        "scan",
        "--collector",
        "http://127.0.0.1:9",
        "--token-file",
        str(token),
        "--probes",
        "matmul",
        "--duration",
        "1",
        "--deadline",
        "100",
    )
    assert _one_line_error(out) == (
        "straggler: error: 1 probe(s) at 1 s need 282 s, more than --deadline 100 s less the 10 s start delay = 90 s"
    )


# --- issue 7 item 4 follow-up: non-finite numbers, real opens and binds, the real source --------


TOKEN_ENV = {"STRAGGLER_COLLECTOR_TOKEN": "0123456789abcdef0123"}


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_one_rule_refuses_a_non_finite_number_from_every_source(tmp_path, bad):
    from straggler.agent.settings import AgentSettings
    from straggler.collector.settings import CollectorSettings

    for cls, prefix in ((Cfg, "X_"), (AgentSettings, "A_"), (CollectorSettings, "C_")):
        floats = [f.name for f in dataclasses.fields(cls) if f.type in ("float", float)]
        assert floats
        for name in floats:
            cfg = tmp_path / "c.toml"
            cfg.write_text(f"{name} = {bad}\n")
            for kw in ({"path": cfg}, {"env": {f"{prefix}{name.upper()}": bad}}, {"overrides": {name: float(bad)}}):
                with pytest.raises(ConfigError, match="must be a finite number"):
                    config.load(cls, **{"env_prefix": prefix, "env": {}, **kw})


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["agent", "--interval", "nan"], {}, "--interval: must be a finite number"),
        (["agent", "--interval", "inf"], {}, "--interval: must be a finite number"),
        (
            ["agent"],
            {"STRAGGLER_AGENT_PROBE_DURATION_S": "nan"},
            "STRAGGLER_AGENT_PROBE_DURATION_S: must be a finite number",
        ),
        (["agent"], {"STRAGGLER_AGENT_HTTP_TIMEOUT_S": "1e300"}, "STRAGGLER_AGENT_HTTP_TIMEOUT_S: must be at most"),
        (
            ["collector"],
            {"STRAGGLER_COLLECTOR_MAX_WAIT_S": "-inf"},
            "STRAGGLER_COLLECTOR_MAX_WAIT_S: must be a finite number",
        ),
    ],
)
def test_non_finite_and_huge_numbers_fail_check_and_start_alike(tmp_path, args, env, expected):
    spool = (
        ["--spool", str(tmp_path / "s.sqlite"), "--listen-port", "0", "--telemetry", "cpu"]
        if args[0] == "agent"
        else ["--db", str(tmp_path / "c.db"), "--port", "0"]
    )
    env = {**TOKEN_ENV, **env}
    checked = _one_line_error(_cli(*args, *spool, "--check", env=env))
    assert expected in checked, checked
    assert "nan s" not in checked  # not "2 probe(s) at nan s need nan s"
    assert _one_line_error(_cli(*args, *spool, env=env, timeout=120)) == checked


def test_a_config_error_names_the_real_source_not_a_missing_default_file(tmp_path):
    env = {**TOKEN_ENV, "STRAGGLER_COLLECTOR_MAX_WAIT_S": "-5"}
    line = _one_line_error(_cli("collector", "--check", "--db", str(tmp_path / "c.db"), env=env))
    assert "/etc/straggler" not in line and "STRAGGLER_COLLECTOR_MAX_WAIT_S" in line and "must be > 0" in line, line
    line = _one_line_error(
        _cli("collector", "--check", "--db", str(tmp_path / "c.db"), "--port", "70000", env=TOKEN_ENV)
    )
    assert "/etc/straggler" not in line and "--port" in line, line
    cfg = tmp_path / "agent.toml"
    cfg.write_text("interval_s = -1\n")
    line = _one_line_error(_cli("agent", "--check", "--config", str(cfg), "--spool", str(tmp_path / "s.sqlite")))
    assert str(cfg) in line and "interval_s: must be > 0" in line, line


@pytest.mark.parametrize("component", ["agent", "collector"])
def test_a_database_sqlite_cannot_create_fails_check_and_start_alike(tmp_path, component):
    """/proc is a writable-looking directory for root, but SQLite cannot create a file there."""
    path = Path(f"/proc/straggler-{component}.sqlite")
    if component == "agent":
        args, key = ["agent", "--spool", str(path), "--listen-port", "0", "--telemetry", "cpu"], "spool_path"
    else:
        args, key = ["collector", "--db", str(path), "--port", "0"], "db_path"
    checked = _one_line_error(_cli(*args, "--check", env=TOKEN_ENV))
    assert f"{key}: " in checked and str(path) in checked, checked
    assert _one_line_error(_cli(*args, env=TOKEN_ENV, timeout=120)) == checked


def test_collector_check_reads_an_existing_database_and_never_migrates_it(tmp_path):
    """--check beside an older collector must not upgrade its database (that collector could then
    not restart); a schema newer than this build fails --check and the start alike, in one line."""
    import sqlite3

    from straggler.collector.schema import LATEST

    older = tmp_path / "older.db"
    with sqlite3.connect(older) as db:
        db.execute("CREATE TABLE t (x)")
        db.execute(f"PRAGMA user_version = {LATEST - 1}")
    out = _cli("collector", "--db", str(older), "--port", "0", "--check", env=TOKEN_ENV)
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(older) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == LATEST - 1  # untouched
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {LATEST + 1}")
    args = ["collector", "--db", str(newer), "--port", "0"]
    checked = _one_line_error(_cli(*args, "--check", env=TOKEN_ENV))
    assert f"database schema version {LATEST + 1} is newer" in checked and str(newer) in checked, checked
    started = _one_line_error(_cli(*args, env=TOKEN_ENV, timeout=120))  # was a traceback
    assert f"database schema version {LATEST + 1} is newer" in started and "db_path: " in started, started


@pytest.mark.parametrize("component", ["agent", "collector"])
def test_check_leaves_nothing_behind_when_it_creates_the_database(tmp_path, component):
    path = tmp_path / "new" / "dir" / "db.sqlite"
    args = (
        ["agent", "--spool", str(path), "--listen-port", "0", "--telemetry", "cpu"]
        if component == "agent"
        else ["collector", "--db", str(path), "--port", "0"]
    )
    out = _cli(*args, "--check", env=TOKEN_ENV)
    assert out.returncode == 0, out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("component", ["agent", "collector"])
def test_a_port_in_use_fails_check_and_start_alike(tmp_path, component):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        if component == "agent":
            args = ["agent", "--spool", str(tmp_path / "s.sqlite"), "--listen-port", str(port), "--telemetry", "cpu"]
        else:
            args = ["collector", "--db", str(tmp_path / "c.db"), "--port", str(port)]
        checked = _one_line_error(_cli(*args, "--check", env=TOKEN_ENV))
        assert f"127.0.0.1:{port}" in checked and "in use" in checked.lower(), checked
        assert _one_line_error(_cli(*args, env=TOKEN_ENV, timeout=120)) == checked
    finally:
        taken.close()


@pytest.mark.parametrize("as_json", [False, True])
def test_agent_check_prints_the_effective_node_name_and_probe_command(tmp_path, as_json):
    import json

    out = _cli("agent", "--check", "--spool", str(tmp_path / "s.sqlite"), *(["--json"] if as_json else []))
    assert out.returncode == 0, out
    if as_json:
        data = json.loads(out.stdout)
    else:
        import ast

        data = {k: ast.literal_eval(v) for k, v in (ln.split(" = ", 1) for ln in out.stdout.splitlines())}
    assert data["host"] == socket.gethostname()
    assert data["probe_command"] == [sys.executable, "-m", "straggler", "scan"]


@pytest.mark.parametrize("option", ["--start-at", "--duration", "--deadline"])
def test_scan_refuses_a_non_finite_time(option):
    out = _cli("scan", "--device", "cpu", "--probes", "matmul", "--duration", "0.2", option, "inf", timeout=120)
    line = _one_line_error(out)
    assert f"{option} must be a finite number" in line, line
