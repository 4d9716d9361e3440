"""The collector's listening socket, bound before the app starts (``service.serve``) and tried by
``settings.check_start`` (``--check``): a module of its own, so that settings need not import the
service that imports them."""

from __future__ import annotations

import socket

from straggler.errors import StragglerError


def bind(address: str, port: int) -> socket.socket:
    """A listening TCP socket, or a one-line StragglerError."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every small response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise StragglerError(f"cannot listen on {address}:{port}: {e.strerror or e}") from None
    return sock
