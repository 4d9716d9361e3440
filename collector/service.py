"""Run the collector: bind, serve with uvicorn, talk to systemd (READY, STATUS, WATCHDOG, STOPPING).

The watchdog ping is sent from the server's event loop, so a loop that hangs stops the pings and
systemd restarts the service. SIGTERM and SIGINT stop it gracefully (uvicorn's handlers); SIGHUP
re-reads the token (token_file or STRAGGLER_COLLECTOR_TOKEN) so it can be rotated without a restart;
other settings need a restart.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Callable

from straggler.errors import ConfigError, StragglerError

from straggler.sdnotify import Notifier
from .guard import uvicorn_config
from .listen import bind
from .settings import CollectorSettings, load_token

log = logging.getLogger("straggler.collector")


def serve(settings: CollectorSettings, token: str, *, analyze: Callable | None = None) -> None:
    """Serve until SIGTERM/SIGINT."""
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app, sock = _app_and_socket(settings, token, analyze)
    host, port = sock.getsockname()[:2]
    notifier = Notifier()

    def reload_token() -> None:
        try:
            app.state.collector.secret.set(load_token(settings))
        except ConfigError as e:
            log.error("SIGHUP: token not reloaded, keeping the current one: %s", e)
            return
        log.info("SIGHUP: token reloaded")

    class Server(_server_type(uvicorn, app)):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.should_exit:
                return
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_token)
            log.info("collector listening on http://%s:%d (database %s)", host, port, app.state.collector.store.name)
            notifier.ready(f"listening on {host}:{port}")
            if notifier.watchdog_s:
                interval = max(notifier.watchdog_s / 2, 0.1)
                self._watchdog = asyncio.get_running_loop().create_task(_watchdog(notifier, interval))

        async def shutdown(self, sockets=None):
            notifier.stopping()
            await super().shutdown(sockets)

    config = uvicorn_config(
        app,
        settings,
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
        log_config=None,
    )
    # uvicorn handles SIGTERM itself, then re-raises it with the handler that was there before: make
    # that one a no-op so that a clean stop exits 0 rather than dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    Server(config).run(sockets=[sock])


def _server_type(uvicorn, app) -> type:
    """uvicorn's server, answering the collector's long polls first when it stops: its graceful stop
    waits for open requests, and a poll can wait far longer than it."""

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.collector.board.close()
            await super().shutdown(sockets)

    return Server


def _app_and_socket(settings: CollectorSettings, token: str, analyze: Callable | None):
    from .app import create_app

    from . import db
    from .store import open_problem

    try:
        app = create_app(settings, token, analyze=analyze)
    except (OSError, RuntimeError, ValueError) + db.errors(settings.db_path) as e:
        raise StragglerError(f"cannot open database: {open_problem(settings.db_path, e)}") from None
    return app, bind(settings.address, settings.port)


class BackgroundCollector:
    """A collector served from a thread of this process (tests, benchmarks, end-to-end checks).

    ``with BackgroundCollector(settings, token) as c: httpx.get(c.url + "/healthz")``
    """

    def __init__(
        self, settings: CollectorSettings, token: str, *, analyze: Callable | None = None, start_timeout_s: float = 15.0
    ):
        import uvicorn

        self.app, sock = _app_and_socket(settings, token, analyze)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        config = uvicorn_config(
            self.app, settings, log_level="warning", access_log=False, log_config=None, timeout_graceful_shutdown=2
        )
        self.server = _server_type(uvicorn, self.app)(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="collector", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise StragglerError(f"the collector did not start within {start_timeout_s:g} s")
            time.sleep(0.01)

    @property
    def collector(self):
        return self.app.state.collector

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> "BackgroundCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _watchdog(notifier: Notifier, interval_s: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s)
