"""Half-open (slowloris) clients shared by the collector's and the agent's attack tests (no tests here):
connections from 127.0.0.2 that send the start of a request head and never its end."""

from __future__ import annotations

import resource
import socket

ATTACKERS = 1100
ATTACKER_ADDRESS = "127.0.0.2"  # one client address, apart from the legitimate client's 127.0.0.1


def nofile_1024() -> None:
    """``preexec_fn``: the soft and hard ``RLIMIT_NOFILE`` of a unit without ``LimitNOFILE``."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def open_half_open(port: int, head: bytes, n: int = ATTACKERS) -> list[socket.socket]:
    """``n`` connections to 127.0.0.1:``port``, each having sent ``head`` (never completed); this
    process's own ``RLIMIT_NOFILE`` is raised to hold them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
    socks = []
    stalled = False  # a connect timed out: the server stopped accepting; the rest connect without waiting
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((ATTACKER_ADDRESS, 0))
        if stalled:
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        else:
            s.settimeout(1)  # a loopback connect to a server that accepts takes well under a millisecond
            try:
                s.connect(("127.0.0.1", port))
            except socket.timeout:
                stalled = True
        s.setblocking(False)
        try:
            s.send(head)  # the head never ends
        except OSError:
            pass  # closed by the server already
        socks.append(s)
    return socks


def closed(s: socket.socket) -> bool:
    """Whether the server closed (or reset) the connection ``s``."""
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False  # still open
    except OSError:
        return True  # reset
