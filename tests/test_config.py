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
    cfg = config.load(Cfg, f, env_prefix="X_", env={"X_PORT": "2000", "X_ENABLED": "no"},
                      overrides={"address": "0.0.0.0", "token_file": None})
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

import subprocess
import sys


def _cli(*args, env=None, timeout=60):
    import os

    return subprocess.run([sys.executable, "-m", "straggler", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _one_line_error(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("straggler: error: "), out
    return lines[0]


@pytest.mark.parametrize("toml, expected", [
    ('probes = ["matmul", "membww"]\n', "probes: unknown probe 'membww'"),
    ('telemetry = "gpu"\n', "telemetry: unknown telemetry backend 'gpu'"),
    ('telemetry = "fake:no_such_scenario"\n', "no such telemetry fixture"),
    ('probe_deadline_s = 300\nprobe_duration_s = 60\n',
     "2 probe(s) at 60 s need 560 s, more than probe_deadline_s = 300 s"),
])
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


@pytest.mark.parametrize("kind, expected", [("not a database", "cannot be opened as an SQLite database"),
                                            ("parent is a file", "is not a directory")])
@pytest.mark.parametrize("component", ["agent", "collector"])
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
    out = _cli("scan", "--collector", "http://127.0.0.1:9", "--token-file", str(token), "--probes", "matmul",
               "--duration", "1", "--deadline", "100")
    assert _one_line_error(out) == ("straggler: error: 1 probe(s) at 1 s need 282 s, more than --deadline 100 s "
                                    "less the 10 s start delay = 90 s")
