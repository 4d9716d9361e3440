"""Half-open clients against a real agent's /metrics port (``straggler agent``) on 127.0.0.1.

The attacker connects from 127.0.0.2 and sends the start of a request head, never its end (a
slowloris); the agent runs with ``RLIMIT_NOFILE`` 1024, what a unit without ``LimitNOFILE`` gets
(the shipped unit sets 8192). 1,100 such connections must not stop a scrape nor take the agent's
file descriptors."""

import os
import time

import httpx

from half_open import ATTACKERS, closed, open_half_open
from test_agent_support import AgentProcess

HEAD = b"GET /metrics HTTP/1.1\r\nHost: node\r\nAccept: text/plain\r\n"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_1100_half_open_connections_do_not_stop_the_agents_metrics(tmp_path):
    try:
        from straggler.agent.metrics_server import HEADER_TIMEOUT_S as header_timeout_s
        from straggler.agent.metrics_server import MAX_CONNECTIONS_PER_CLIENT as cap
    except ImportError:  # the code before the guard
        header_timeout_s, cap = 10.0, 16
    agent = AgentProcess(tmp_path, "node-s", prefix=["prlimit", "--nofile=1024:1024", "--"]).start()
    socks = []
    try:
        fds_before = _fds(agent.proc.pid)
        socks = open_half_open(agent.port, HEAD)
        t0 = time.monotonic()
        # the scraper: answered while the attack holds, well before the held ones time out
        try:
            r = httpx.get(agent.url + "/metrics", timeout=header_timeout_s / 2)
            scrape_s = time.monotonic() - t0
        except httpx.TransportError as e:
            raise AssertionError(
                f"/metrics did not answer within {header_timeout_s / 2} s with {ATTACKERS} "
                f"half-open connections held: {e!r}"
            ) from None
        msg = f"/metrics answered in {scrape_s * 1000:.1f} ms with {ATTACKERS} half-open connections"
        print("\n" + msg)
        assert r.status_code == 200, msg
        assert "straggler_agent_ticks_total" in r.text, msg
        # past the cap, the attacker's connections were closed at once; the rest once the head is late
        # (waited for up to half the header timeout: before any held one can have timed out)
        cap_deadline = t0 + header_timeout_s / 2
        held = sum(not closed(s) for s in socks)
        while held > cap and time.monotonic() < cap_deadline:
            time.sleep(0.2)
            held = sum(not closed(s) for s in socks)
        fds_attacked = _fds(agent.proc.pid)
        assert held <= cap, f"{held} half-open connections held (cap {cap}); {msg}"
        assert fds_attacked <= fds_before + cap + 4, f"{fds_attacked} fds open, {fds_before} before; {msg}"
        deadline = t0 + header_timeout_s * 3
        while held and time.monotonic() < deadline:
            time.sleep(0.2)
            held = sum(not closed(s) for s in socks)
        assert held == 0, f"{held} half-open connections still held {header_timeout_s * 3} s on; {msg}"
        assert agent.proc.poll() is None, agent.log()[-2000:]
    finally:
        for s in socks:
            s.close()
        agent.stop()
        agent.close()
