"""systemd's notify protocol, by hand: one datagram to ``$NOTIFY_SOCKET`` (no extra dependency).

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op that returns False.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send e.g. ``"READY=1"``, ``"WATCHDOG=1"``, ``"STATUS=..."``. True when a datagram was sent."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.setblocking(False)  # never stall the event loop on a receiver that does not read
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError:
            return False  # systemd went away or its queue is full: nothing to tell now
    return True


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """How often to send WATCHDOG=1 (half of WatchdogSec), or None when no watchdog is set for us."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.1)
    except ValueError:
        return None
