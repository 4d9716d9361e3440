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
