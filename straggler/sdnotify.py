"""systemd's notify protocol, by hand: one datagram to ``$NOTIFY_SOCKET`` (no extra dependency).

Used by both daemons (agent and collector) for READY=1, STATUS=..., WATCHDOG=1, STOPPING=1 and
RELOADING=1. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op returning False. Sends never
block: a receiver that does not read must not stall a daemon's loop.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # WatchdogSec of the unit, when the watchdog is set for this process; ping at half of it.
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when a notify socket took it."""
        if not self.address:
            return False
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address  # abstract namespace
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                sock.connect(addr)
                sock.sendall("\n".join(fields).encode())
            except OSError:
                return False  # systemd went away or its queue is full: nothing to tell now
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")
