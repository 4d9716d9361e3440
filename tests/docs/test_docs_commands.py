"""Every command line the docs show is run as written, so a doc and the program cannot drift apart.

The test data are the fenced code blocks of README.md and docs/*.md:

- a block fenced as ```` ```sh ```` holds command lines (a trailing ``\\`` continues a line, ``  # ...``
  is a comment, ``[--flag]`` is optional: the line is run without and with it). Each line is one test
  case below; where a block is a sequence (make a token, then use it), the case runs the lines
  before it in the same directory first, as a reader would.
- a block fenced as ```` ```text ```` is a synopsis or sample output; a synopsis line starting with
  ``straggler <command>`` must only name options that ``straggler <command> --help`` lists.
- every fenced block says which it is (or ``json``, ``yaml``, ``toml``, ``python``): a block without
  a language fails the test, so a command cannot hide from it.

Each documented command is in CASES (how it runs here: in a fresh directory, with the program's
documented environment variables pointing ports and files there, and placeholders such as the host
``collector`` replaced by what the test started) or in NOT_HERE with the reason it cannot run on
this machine; a command in neither, or an entry no doc shows any more, fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port, run_cmd, scan_timeout_s, skip_or_fail

from straggler.probes.budget import SETUP_S
from straggler.records import write_table

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
LANGS = {"sh", "text", "json", "yaml", "toml", "python"}
BIN = Path(sys.executable).parent  # the `straggler` of this interpreter's environment


def fenced_blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line number of the opening fence, language, lines) of every fenced block in ``path``."""
    out, cur = [], None
    for no, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if cur is None and m:
            cur = (no, m.group(1), [])
        elif cur is not None and line.startswith("```"):
            out.append(cur)
            cur = None
        elif cur is not None:
            cur[2].append(line)
    assert cur is None, f"{path.name}:{cur[0]}: a fenced block is not closed"
    return out


def command_lines(lines: list[str]) -> list[str]:
    """The commands of an ``sh`` block: continuation lines joined, comments and blank lines dropped."""
    out, buf = [], ""
    for line in lines:
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip() + " "
            continue
        cmd = re.sub(r"\s+#\s.*$", "", buf).strip()
        buf = ""
        if cmd:
            out.append(re.sub(r"\s+", " ", cmd))
    return out


def expand(cmd: str) -> list[str]:
    """``straggler agent --check [--json]`` -> without and with the optional part."""
    m = re.search(r" \[([^\]|]+)\]", cmd)
    if m is None:
        return [cmd]
    return expand(cmd[: m.start()] + cmd[m.end() :]) + expand(cmd[: m.start()] + " " + m.group(1) + cmd[m.end() :])


def documented() -> list[tuple[str, str, list[str]]]:
    """(where, command, the commands before it in its block) for every documented command line."""
    out = []
    for path in DOCS:
        for no, lang, lines in fenced_blocks(path):
            if lang != "sh":
                continue
            before: list[str] = []
            for cmd in command_lines(lines):
                for variant in expand(cmd):
                    out.append((f"{path.relative_to(ROOT)}:{no}", variant, list(before)))
                before.append(cmd)
    return out


DOCUMENTED = documented()


def test_every_fenced_block_says_what_it_is():
    unlabelled = [f"{p.relative_to(ROOT)}:{no}" for p in DOCS for no, lang, _ in fenced_blocks(p) if lang not in LANGS]
    assert unlabelled == [], f"fenced blocks without one of {sorted(LANGS)} (```sh for commands)"


def test_every_documented_command_has_a_case():
    cmds = {c for _, c, _ in DOCUMENTED}
    assert cmds - CASES.keys() - NOT_HERE.keys() == set(), "documented commands this test does not run"
    assert (CASES.keys() | NOT_HERE.keys()) - cmds == set(), "cases for commands no doc shows any more"


def test_synopses_name_only_options_the_program_has():
    checked = 0
    for path in DOCS:
        for no, lang, lines in fenced_blocks(path):
            text = " ".join(lines)
            m = re.match(r"\s*straggler (\w+) ", text)
            if lang != "text" or m is None:
                continue
            proc = run_cmd([str(BIN / "straggler"), m.group(1), "--help"], SETUP_S)
            assert proc.returncode == 0, proc.stderr
            helps = proc.stdout
            for sub in sorted(set(re.findall(rf"straggler {m.group(1)} ([a-z]\w*)", text))):  # a group's subcommands
                sub_help = run_cmd([str(BIN / "straggler"), m.group(1), sub, "--help"], SETUP_S)
                helps += sub_help.stdout if sub_help.returncode == 0 else ""
            missing = sorted(set(re.findall(r"--[a-z][\w-]*", text)) - set(re.findall(r"--[a-z][\w-]*", helps)))
            assert missing == [], f"{path.name}:{no}: straggler {m.group(1)} --help lacks {missing}"
            checked += 1
    assert checked >= 1  # docs/scan.md's synopsis at least


@pytest.mark.parametrize("where,cmd,before", DOCUMENTED, ids=[f"{w} {c}" for w, c, _ in DOCUMENTED])
def test_documented_command(where, cmd, before, tmp_path):
    if cmd in NOT_HERE:
        check, why = NOT_HERE[cmd]
        check()  # what can be checked here is checked; then the reason is shown (pytest -rs)
        pytest.skip(f"not run here: {why}")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    CASES[cmd](cmd, tmp_path, env, before)


# --- how each documented command runs here --------------------------------------------------------


def sh(cmd: str, cwd: Path, env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    return run_cmd(["bash", "-c", cmd], timeout_s, cwd=cwd, env=env)


def unit_timeout_s(unit: str, key: str) -> float:
    """``TimeoutStartSec``/``TimeoutStopSec`` of a systemd unit of this repo: how long systemd gives
    the service to come up or stop, so how long the test waits."""
    m = re.search(rf"^{key}=(\d+)s$", (ROOT / "systemd" / unit).read_text(), re.M)
    return float(m.group(1))


def serve(cmd: str, cwd: Path, env: dict, url: str, unit: str, check=None) -> str:
    """Start a documented daemon, wait until ``url`` answers 200 (within the unit's start timeout),
    run ``check(body)``, stop it with SIGTERM and expect exit 0 (within the unit's stop timeout)."""
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {cmd}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        body = wait_http(url, proc, unit)
        if check is not None:
            check(body)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=unit_timeout_s(unit, "TimeoutStopSec"))
        assert proc.returncode == 0, err[-2000:]
        return err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen, unit: str) -> str:
    """The body of ``url`` once it answers 200, waiting as long as systemd gives ``unit`` to start."""
    stop_at = time.monotonic() + unit_timeout_s(unit, "TimeoutStartSec")
    while proc.poll() is None and time.monotonic() < stop_at:
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return r.text
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer 200 within {unit}'s TimeoutStartSec (exit code {proc.poll()})")


def agent_env(env: dict, tmp: Path) -> tuple[dict, int]:
    """Where a documented agent command listens and spools here: a free port and files in ``tmp``
    (the STRAGGLER_AGENT_* variables of docs/agent.md), no scheduled probe."""
    port = free_port()
    return {
        **env,
        "STRAGGLER_AGENT_LISTEN_PORT": str(port),
        "STRAGGLER_AGENT_SPOOL_PATH": str(tmp / "spool.sqlite"),
        "STRAGGLER_AGENT_PROBE_EVERY_S": "0",
        "STRAGGLER_AGENT_TELEMETRY": "cpu",
    }, port


def run_main_command(cmd, tmp, env, before):
    # README's quick start builds .venv in the repository: run it there, where the test command
    # built the .venv these tests run from (installing torch anew would take minutes)
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        skip_or_fail(f"the quick start builds {ROOT / '.venv'}; these tests run from {sys.prefix}")
    # pip re-checks what the test command installed (it may fetch the build backend again), then the scan
    proc = sh(cmd, ROOT, env, 2 * SETUP_S + scan_timeout_s(("matmul", "membw", "allreduce"), 4.0))
    # 1: a straggler (membw on a VM can be one); 2 with "could not decide": no straggler, a device undecided
    assert proc.returncode in (0, 1) or "straggler: error: could not decide: " in proc.stderr, proc.stderr[-2000:]
    assert all(f"cpu{c}" in proc.stdout for c in sorted(os.sched_getaffinity(0))), proc.stdout  # every core


def run_test_command(cmd, tmp, env, before):
    # it is this test suite: .ci/run runs exactly this line; checked here by running .ci/run's own
    # extraction of it from README.md
    awk = re.search(r"cmd=\$\((awk .*)\)$", (ROOT / ".ci" / "run").read_text(), re.M).group(1)
    proc = run_cmd(["bash", "-c", awk], SETUP_S, cwd=ROOT)
    assert proc.stdout.strip() == cmd


def run_agent_default(cmd, tmp, env, before):
    env, port = agent_env(env, tmp)
    serve(
        cmd,
        tmp,
        env,
        f"http://127.0.0.1:{port}/metrics",
        "straggler-agent.service",
        lambda body: _assert_in("straggler_agent", body),
    )


def run_agent_with_collector(cmd, tmp, env, before):
    token, db, cport = tmp / "agent.token", tmp / "collector.db", free_port()
    token.write_text("documented-commands-test-token\n")
    collector = subprocess.Popen(
        [str(BIN / "straggler"), "collector", "--port", str(cport), "--db", str(db), "--token-file", str(token)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{cport}/healthz", collector, "straggler-collector.service")
        aenv, port = agent_env(env, tmp)
        (tmp / "agent.toml").write_text(f'listen_port = {port}\nspool_path = "{tmp / "agent-spool.sqlite"}"\n')
        run = cmd.replace("http://collector:9402", f"http://127.0.0.1:{cport}").replace(
            "/etc/straggler/agent.token", str(token)
        )

        def reached_collector(_):  # its long poll for cluster scans: the collector records the agent
            stop_at = time.monotonic() + unit_timeout_s("straggler-agent.service", "TimeoutStartSec")
            while time.monotonic() < stop_at:
                with sqlite3.connect(db) as con:
                    if con.execute("SELECT host FROM agents").fetchall():
                        return
                time.sleep(0.3)
            pytest.fail("the agent never polled the collector named by --collector-url and --token-file")

        serve(run, tmp, aenv, f"http://127.0.0.1:{port}/metrics", "straggler-agent.service", reached_collector)
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=unit_timeout_s("straggler-collector.service", "TimeoutStopSec"))


def run_agent_check(cmd, tmp, env, before):
    env, _ = agent_env(env, tmp)
    proc = sh(cmd, tmp, env, SETUP_S)
    assert proc.returncode == 0, proc.stderr
    if "--json" in cmd:
        assert "listen_port" in json.dumps(json.loads(proc.stdout))
    else:
        assert "listen_port" in proc.stdout


def scan_rows(host: str, gpus: list[str], values: list[float], ts: float = 1.8e9, scan: str = "s1") -> list[dict]:
    """Result-table rows of H100s' matmul (the README's columns), 5 samples per device."""
    return [
        {
            "ts": ts + i,
            "scan_id": scan,
            "host": host,
            "gpu": g,
            "index": n,
            "model": "NVIDIA H100 80GB HBM3",
            "probe": "matmul",
            "settings": "n=8192,dtype=bf16",
            "sample": i,
            "value": v * (1 + 0.001 * i),
            "unit": "TFLOP/s",
        }
        for n, (g, v) in enumerate(zip(gpus, values))
        for i in range(5)
    ]


GPUS = [f"GPU-{i:08d}-0000-0000-0000-000000000000" for i in range(8)]
SLOW = GPUS[5]  # 20% slower than its 7 peers


def analyze_files(tmp: Path) -> None:
    node = scan_rows("node17", GPUS, [790.0] * 5 + [632.0] + [790.0] * 2)
    for name in ("scan.csv", "scan.parquet", "today.csv"):
        write_table(node, tmp / name)
    write_table(scan_rows("node17", GPUS, [790.0] * 8, ts=1.7e9, scan="s0"), tmp / "last-month.parquet")
    write_table(scan_rows("node18", GPUS[:1], [791.2]), tmp / "one-gpu.csv")


def run_analyze(cmd, tmp, env, before):
    analyze_files(tmp)
    proc = sh(cmd, tmp, {**env, "COLUMNS": "200"}, SETUP_S)
    if "one-gpu.csv" in cmd:  # a healthy H100 (791 TFLOP/s) against the documented reference
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the slow GPU is found
    if "--json" in cmd:
        doc = json.loads(proc.stdout)
        assert {g["gpu"] for g in doc["gpus"] if g["straggler"]} == {SLOW}
    else:
        assert SLOW in proc.stdout, proc.stdout


def after(before: list[str], tmp: Path, env: dict) -> None:
    """Run the lines before this one in its block, as a reader does before reaching it."""
    for line in before:
        proc = sh(line, tmp, env, SETUP_S)
        assert proc.returncode == 0, (line, proc.stderr)


def run_token_echo(cmd, tmp, env, before):
    proc = sh(cmd, tmp, env, SETUP_S)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp / "collector.token").read_text().strip()) >= 32


def run_chmod(cmd, tmp, env, before):
    after(before, tmp, env)
    assert sh(cmd, tmp, env, SETUP_S).returncode == 0
    assert (tmp / "collector.token").stat().st_mode & 0o777 == 0o600


def run_collector(cmd, tmp, env, before):
    after(before, tmp, env)
    port = free_port()
    serve(
        cmd,
        tmp,
        {**env, "STRAGGLER_COLLECTOR_PORT": str(port)},
        f"http://127.0.0.1:{port}/healthz",
        "straggler-collector.service",
    )
    assert (tmp / "collector.db").is_file()


def _assert_in(word: str, text: str) -> None:
    assert word in text, text[:2000]


CASES = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e . && "
    ".venv/bin/straggler scan": run_main_command,
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[test]' && "
    ".venv/bin/python -m pytest -q -rs": run_test_command,
    "straggler agent": run_agent_default,
    "straggler agent --config agent.toml --collector-url http://collector:9402 --token-file "
    "/etc/straggler/agent.token": run_agent_with_collector,
    "straggler agent --check": run_agent_check,
    "straggler agent --check --json": run_agent_check,
    "straggler analyze scan.csv": run_analyze,
    "straggler analyze scan.parquet --json": run_analyze,
    "straggler analyze today.csv --history last-month.parquet --job-sizes 8,64,1024": run_analyze,
    'straggler analyze one-gpu.csv --reference "NVIDIA H100 80GB HBM3|matmul=780"': run_analyze,
    "echo \"$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\" > collector.token": run_token_echo,
    "chmod 600 collector.token": run_chmod,
    "straggler collector --token-file collector.token --db ./collector.db": run_collector,
}


def _exist(*paths: str):
    def check():
        missing = [p for p in paths if not (ROOT / p).exists()]
        assert missing == [], f"the documented command names files that are not in the repository: {missing}"

    return check


def _scan_accepts(*options: str):
    def check():
        out = run_cmd([str(BIN / "straggler"), "scan", "--help"], SETUP_S).stdout
        assert all(o in out for o in options), out

    return check


SYSTEMD = (
    "installs into /etc and starts a systemd service: needs a machine booted with systemd (the units are "
    "checked by tests/systemd/test_systemd_units.py with systemd-analyze)"
)
NOT_HERE = {
    "sudo install -d /etc/straggler": (_exist(), SYSTEMD),
    "sudo install -m 600 collector.token /etc/straggler/collector.token": (_exist(), SYSTEMD),
    "sudo install -m 644 systemd/collector.toml /etc/straggler/collector.toml": (
        _exist("systemd/collector.toml"),
        SYSTEMD,
    ),
    "sudo install -m 644 systemd/straggler-collector.service /etc/systemd/system/": (
        _exist("systemd/straggler-collector.service"),
        SYSTEMD,
    ),
    "sudo systemctl daemon-reload && sudo systemctl enable --now straggler-collector": (_exist(), SYSTEMD),
    ".venv/bin/python -m pytest -q -p no:cacheprovider tests/collector/test_collector_api.py tests/collector/test_collector_scans.py "
    "tests/collector/test_collector_store.py tests/collector/test_collector_service.py tests/collector/test_collector_fuzz.py "
    "tests/systemd/test_systemd_units.py": (
        _exist(
            "tests/collector/test_collector_api.py",
            "tests/collector/test_collector_scans.py",
            "tests/collector/test_collector_store.py",
            "tests/collector/test_collector_service.py",
            "tests/collector/test_collector_fuzz.py",
            "tests/systemd/test_systemd_units.py",
        ),
        "runs part of this test suite, which runs those files anyway (checked: they exist)",
    ),
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m straggler scan "
    "--json --output cluster.parquet": (
        _scan_accepts("--json", "--output"),
        "2 nodes of 8 GPUs; tests/probes/test_torchrun.py runs the same launch on two "
        "loopback nodes of one CPU core each",
    ),
}
