"""A real headless Chromium driven over the DevTools protocol (CDP), for the report tests.

The browser runs with ``--remote-debugging-pipe``: CDP messages are NUL-terminated JSON on file
descriptors 3 (to the browser) and 4 (from it), so no websocket client and no port are needed.
Every page opened records its console messages, uncaught exceptions, log entries (CSP
violations, failed loads) and the URL of every request it made.

    with Chromium(exe, tmp) as browser:
        page = browser.open("file:///tmp/report.html", offline=True)
        page.text, page.errors, page.requests
        page.screenshot(path)
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 120.0  # a cold browser on a busy 2-core machine
CALL_TIMEOUT_S = 120.0  # one CDP call, a page load included


@dataclass
class Page:
    session: str
    browser: "Chromium"
    errors: list[str] = field(default_factory=list)  # console errors/warnings, exceptions, log entries
    requests: list[str] = field(default_factory=list)  # URL of every request the page made
    loaded: threading.Event = field(default_factory=threading.Event)
    text: str = ""

    def call(self, method: str, **params) -> dict:
        return self.browser.call(method, params, self.session)

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, path: Path, width: int = 1280, height: int | None = None) -> Path:
        """A PNG of the page at ``width`` CSS pixels, ``height`` high (the whole page when None)."""
        full = int(self.evaluate("document.documentElement.scrollHeight"))
        self.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=height or full, deviceScaleFactor=1, mobile=False
        )
        shot = self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=height is None,
            clip={"x": 0, "y": 0, "width": width, "height": height or full, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


class Chromium:
    def __init__(self, exe: str, user_data_dir: Path):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def child() -> None:  # the pipes at fds 3 and 4, as --remote-debugging-pipe expects
            a, b = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log_path = Path(user_data_dir).with_suffix(".log")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--mute-audio",
                f"--user-data-dir={user_data_dir}",
                # no name resolves but 127.0.0.1: a page that reached for the network would fail (and say so)
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(3, 4),
            preexec_fn=child,
        )
        log.close()
        os.close(to_r)
        os.close(from_w)
        self._next = 0
        self._lock = threading.Lock()
        self._replies: dict[int, dict] = {}
        self._cv = threading.Condition()
        self.pages: dict[str, Page] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.call("Browser.getVersion", timeout_s=START_TIMEOUT_S)

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_r, 1 << 16)
            if not chunk:
                with self._cv:
                    self._replies[-1] = {"error": {"message": "browser closed the pipe"}}
                    self._cv.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                self._dispatch(json.loads(raw))

    def _dispatch(self, msg: dict) -> None:
        if "id" in msg:
            with self._cv:
                self._replies[msg["id"]] = msg
                self._cv.notify_all()
            return
        page = self.pages.get(msg.get("sessionId", ""))
        if page is None:
            return
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            page.errors.append(
                f"console.{p['type']}: "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            )
        elif method == "Runtime.exceptionThrown":
            page.errors.append(
                f"exception: {p['exceptionDetails'].get('text')} "
                f"{p['exceptionDetails'].get('exception', {}).get('description', '')}"
            )
        elif method == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
            page.errors.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            page.requests.append(p["request"]["url"])
        elif method == "Network.loadingFailed":
            page.errors.append(f"load failed: {p.get('errorText')} {p.get('blockedReason', '')}")
        elif method == "Page.loadEventFired":
            page.loaded.set()

    def call(
        self, method: str, params: dict | None = None, session: str | None = None, timeout_s: float = CALL_TIMEOUT_S
    ) -> dict:
        with self._lock:
            self._next += 1
            mid = self._next
            msg = {"id": mid, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        with self._cv:
            if not self._cv.wait_for(lambda: mid in self._replies or -1 in self._replies, timeout_s):
                raise TimeoutError(f"chromium: no answer to {method} within {timeout_s:.0f} s")
            reply = self._replies.pop(mid, None) or self._replies[-1]
        if "error" in reply:
            raise RuntimeError(f"chromium: {method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def open(self, url: str, *, offline: bool = False, headers: dict | None = None) -> Page:
        """Open ``url`` in a new tab and wait for its load event; ``offline``: the network is off
        (file:// pages), ``headers``: added to every request (the collector's token)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(session, self)
        self.pages[session] = page
        for domain in ("Runtime", "Log", "Network", "Page"):
            page.call(f"{domain}.enable")
        if offline:
            page.call(
                "Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1, uploadThroughput=-1
            )
        if headers:
            page.call("Network.setExtraHTTPHeaders", headers=headers)
        page.loaded.clear()  # a late load event of about:blank is not this page's
        nav = page.call("Page.navigate", url=url)
        if nav.get("errorText"):
            raise AssertionError(f"{url}: {nav['errorText']}")
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            if not page.loaded.wait(max(deadline - time.monotonic(), 0)):
                raise TimeoutError(f"{url}: no load event within {CALL_TIMEOUT_S:.0f} s")
            blank = "true" if url == "about:blank" else "location.href !== 'about:blank'"
            if page.evaluate(f"{blank} && document.readyState === 'complete'"):
                break
            page.loaded.clear()
        page.text = page.evaluate("document.body.innerText")
        return page

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout_s=30)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_w)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
