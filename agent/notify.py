"""sd_notify written by hand: datagrams to $NOTIFY_SOCKET (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1).

Without NOTIFY_SOCKET (not run by systemd) every call is a no-op returning False.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, env: dict | None = None) -> None:
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when a notify socket took it."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(addr)
                sock.sendall("\n".join(fields).encode())
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")
