"""A real single-node Slurm on 127.0.0.1 for the tests about Slurm (Debian ``slurm-wlm`` and ``munge``).

Installs nothing (``.ci/run`` does); a missing Slurm skips here and fails under CI
(``conftest.skip_or_fail``). Everything lives in one temporary directory: munged's key, socket,
log and pid file (in ``munge/``, owned by ``munge``, mode 755), slurm.conf, state, spool, pid and
log files. ``SLURM_CONF`` is exported in :attr:`Slurm.env` for every client command. The
configuration is the one known to work here as root without systemd or cgroups (issue 11)::

    SlurmctldHost=localhost  SlurmUser=root  SlurmdUser=root
    AuthType=auth/munge  AuthInfo=socket=<dir>/munge/munge.socket
    ProctrackType=proctrack/linuxproc  TaskPlugin=task/none  JobAcctGatherType=jobacct_gather/none
    AccountingStorageType=accounting_storage/none  SelectType=select/cons_tres
    ReturnToService=2  PrologFlags=Alloc  NodeName=localhost NodeAddr=127.0.0.1 CPUs=2

Every daemon runs in the foreground as a child of the test (so each is stopped by its own pid at
the end, SIGTERM then SIGKILL). One Slurm per test module (``scope="module"``): it takes ~5-10 s to
come up. Use it as::

    from slurm import slurm_fixture
    slurm = slurm_fixture(extra_conf=("Prolog=/path/to/prolog",))

    def test_x(slurm):
        r = slurm.run(["srun", "-N1", "hostname"])
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest
from conftest import skip_or_fail

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "srun", "scontrol", "squeue", "sbatch")
NODE = "localhost"
UP_TIMEOUT_S = 60.0  # slurmctld + slurmd register in ~5 s here; 60 on a loaded 2-core CI machine
STOP_GRACE_S = 10.0  # per daemon, after SIGTERM, before SIGKILL
CLIENT_TIMEOUT_S = 60.0  # a client command (sinfo, scontrol) that answers in well under a second


@dataclass
class Slurm:
    """A running single-node Slurm. ``env``: this process's environment with SLURM_CONF (and the
    munge socket) set; ``run(cmd)``: a client command under that environment."""

    dir: Path
    conf: Path
    env: dict[str, str]
    node: str = NODE
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(
        self, cmd: Sequence[str], timeout_s: float = CLIENT_TIMEOUT_S, env: dict | None = None, **kw
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` with :attr:`env` (plus ``env``), capture its text output; past ``timeout_s``
        its process group is killed and the test fails saying so."""
        from conftest import run_cmd

        return run_cmd(list(map(str, cmd)), timeout_s, env={**self.env, **(env or {})}, **kw)

    def node_state(self) -> str:
        """The node's state as ``sinfo`` prints it (``idle``, ``drain``, ``alloc``, ``down*`` ...)."""
        return self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"]).stdout.strip()

    def drain_reason(self) -> str:
        """The reason ``sinfo -R`` shows for the node ('' when none)."""
        return self.run(["sinfo", "-h", "-R", "-n", self.node, "-o", "%E"]).stdout.strip()

    def resume(self) -> None:
        """Put the node back to service (after a test drained it)."""
        self.run(["scontrol", "update", f"nodename={self.node}", "state=resume"])
        self.wait_state(("idle",))

    def wait_state(self, states: Sequence[str], timeout_s: float = UP_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.node_state()
            if state in states:
                return state
            self._check_alive()
            time.sleep(0.2)
        pytest.fail(
            f"slurm node {self.node} is {state!r}, not {'/'.join(states)}, after {timeout_s:.0f} s; {self._logs()}"
        )

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                pytest.fail(f"{name} exited with code {p.returncode}; {self._logs()}")

    def _logs(self) -> str:
        parts = []
        for name in ("slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log", "munge/munged.log"):
            with contextlib.suppress(OSError):
                text = (self.dir / name).read_text()
                errors = [x for x in text.splitlines() if "error" in x.lower() or "fatal" in x.lower()]
                parts.append(f"{name}: {' / '.join(errors[-5:])[-1000:]} ... {text[-600:]}")
        return " | ".join(parts)


def conf_text(d: Path, cpus: int, extra: Sequence[str]) -> str:
    """slurm.conf; an ``AuthInfo=`` line in ``extra`` (e.g. ``AuthInfo=cred_expire=30``) adds to the socket's."""
    auth = ",".join(
        [f"socket={d}/munge/munge.socket", *(x.split("=", 1)[1] for x in extra if x.startswith("AuthInfo="))]
    )
    extra = [x for x in extra if not x.startswith("AuthInfo=")]
    lines = [
        "ClusterName=straggler-test",
        f"SlurmctldHost={NODE}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"AuthInfo={auth}",
        "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "ReturnToService=2",
        "PrologFlags=Alloc",
        "MpiDefault=none",
        f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/slurmctld.log",
        f"SlurmdLogFile={d}/slurmd.log",
        "SlurmctldPort=" + str(_free_port()),
        "SlurmdPort=" + str(_free_port()),
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        *extra,
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


PORT_ATTEMPTS = 3  # starts of slurmctld and slurmd, each with new ports, when one was taken meanwhile


def _free_port() -> int:
    from conftest import free_port

    return free_port()


def _require() -> dict[str, str]:
    missing = [
        n for n in (*DAEMONS, *CLIENTS) if shutil.which(n, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None
    ]
    if missing:
        skip_or_fail(f"slurm not installed: {', '.join(missing)} missing (.ci/run installs slurm-wlm munge)")
    if os.geteuid() != 0:
        skip_or_fail("the test Slurm runs as root (SlurmUser=root, munged as user munge)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        skip_or_fail("no user 'munge' (the munge package creates it)")
    return {n: shutil.which(n, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for n in DAEMONS}


@contextlib.contextmanager
def start_slurm(extra_conf: Sequence[str] = (), cpus: int = 2, preexec_fn=None) -> Iterator[Slurm]:
    """Start munged, slurmctld and ``slurmd -N localhost``; wait until ``sinfo`` shows the node idle;
    yield the :class:`Slurm`; stop every daemon by its pid and remove the directory. ``preexec_fn``
    runs in slurmd before it starts (e.g. ``CpuShield.enter``: its prologs and jobs inherit it)."""
    exe = _require()
    d = Path(tempfile.mkdtemp(prefix="straggler-slurm-"))
    os.chmod(d, 0o755)  # munged runs as 'munge' and must reach munge/ below
    munge = pwd.getpwnam("munge")
    s = None
    try:
        (d / "munge").mkdir(mode=0o755)
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        os.chown(d / "munge", munge.pw_uid, munge.pw_gid)
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"
        as_munge = {"user": munge.pw_uid, "group": munge.pw_gid, "extra_groups": []}
        subprocess.run(
            [exe["mungekey"], "--create", f"--keyfile={key}"],
            check=True,
            capture_output=True,
            timeout=CLIENT_TIMEOUT_S,
            **as_munge,
        )
        conf = d / "slurm.conf"
        conf.write_text(conf_text(d, cpus, extra_conf))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[k]  # a test run inside a Slurm job must not leak its job into ours
        s = Slurm(dir=d, conf=conf, env=env)
        s.procs["munged"] = subprocess.Popen(
            [
                exe["munged"],
                "-F",
                f"--socket={d}/munge/munge.socket",
                f"--key-file={key}",
                f"--log-file={d}/munge/munged.log",
                f"--pid-file={d}/munge/munged.pid",
                f"--seed-file={d}/munge/munged.seed",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **as_munge,
        )
        _wait_path(d / "munge" / "munge.socket", s)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            for name, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D", "-N", NODE])):
                log = open(d / f"{name}.out", "wb")
                s.procs[name] = subprocess.Popen(
                    [exe[name], *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=preexec_fn if name == "slurmd" else None,
                )
                log.close()
            try:
                s.wait_state(("idle",))
                break
            except pytest.fail.Exception as e:
                # the ports were free when chosen, and another process took one before the daemon bound
                # it (a busy machine): choose new ones and start the two daemons again
                if "Address already in use" not in str(e) or attempt == PORT_ATTEMPTS:
                    raise
                for name in ("slurmd", "slurmctld"):
                    _stop(s.procs.pop(name))
                conf.write_text(conf_text(d, cpus, extra_conf))
        yield s
    finally:
        if s is not None:
            for name in ("slurmd", "slurmctld", "munged"):
                if name in s.procs:
                    _stop(s.procs[name])
        shutil.rmtree(d, ignore_errors=True)


def _wait_path(path: Path, s: Slurm) -> None:
    deadline = time.monotonic() + UP_TIMEOUT_S
    while not path.exists():
        s._check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear in {UP_TIMEOUT_S:.0f} s; {s._logs()}")
        time.sleep(0.05)


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM the daemon by its pid, SIGKILL it past the grace."""
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGTERM)
    try:
        p.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.wait()


def slurm_fixture(extra_conf: Sequence[str] = (), cpus: int = 2):
    """A module-scoped pytest fixture ``slurm`` yielding a running :class:`Slurm` (one per module)."""

    @pytest.fixture(scope="module", name="slurm")
    def _slurm():
        with start_slurm(extra_conf, cpus) as s:
            yield s

    return _slurm
