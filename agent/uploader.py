"""Uploads spooled results and scan states to the collector: batches, retries, exponential backoff.

``POST /api/v1/results`` is idempotent by result id, so a batch that may or may not have arrived
(a timeout, a collector killed mid-request) is simply sent again. A row leaves the spool only after
a 200. 413 halves the batch; 422 halves it until the bad row is alone, then moves that row to the
spool's ``rejected`` table (kept, counted, never retried forever) with the collector's reason.

Scan states go only once no result is left to send, so a scan's rows have all been stored or
refused by then: a cluster scan whose rows the collector refused is reported ``failed`` with the
collector's reason, not ``done`` (the scan measured, but the fleet has none of it).
"""

from __future__ import annotations

import logging
import random
import sqlite3
import ssl
import threading
import time

import httpx

from straggler.errors import InputError
from straggler.records import SENT_TS_HEADER
from straggler.scanproto import scan_id_problem
from straggler.token import read_token

from .spool import Spool

log = logging.getLogger("straggler.agent.upload")


class UploadError(Exception):
    """The collector could not take the upload now (retry later)."""


def token_problem(token_file) -> str | None:
    """Why the token in ``token_file`` cannot be sent as a bearer token (``straggler.token.read_token``:
    unreadable, empty, not printable ASCII), else None. Checked at the start and at reads."""
    try:
        read_token(token_file, "token_file")
    except InputError as e:
        return str(e)
    return None


def auth_headers(token_file) -> dict[str, str]:
    """The bearer header (the token file read again: a rotated token needs no restart); OSError
    with the one-line reason when the token cannot be read."""
    if token_file is None:
        return {}
    try:
        return {"Authorization": f"Bearer {read_token(token_file, 'token_file')}"}
    except InputError as e:
        raise OSError(str(e)) from None


def client_options(settings) -> dict:
    """httpx.Client options shared by the uploader and the poller: TLS verification of an
    ``https://`` collector against ``ca_file`` (else the system's CAs)."""
    ca_file = getattr(settings, "ca_file", None)
    return {"verify": ssl.create_default_context(cafile=str(ca_file)) if ca_file else True}


def refusal(resp: httpx.Response) -> str:
    """The collector's reason for refusing a one-row batch (``detail``, without the row's index)."""
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = str(detail) if detail else resp.text or f"status {resp.status_code}"
    return text.removeprefix("results[0].")[:500]


class Uploader:
    def __init__(self, settings, spool: Spool, host: str, metrics=None) -> None:
        self.settings = settings
        self.spool = spool
        self.host = host
        self.metrics = metrics
        self.wake = threading.Event()
        self.batch = settings.upload_batch
        self._client: httpx.Client | None = None

    def client(self) -> httpx.Client:
        if self._client is None:
            try:
                headers = auth_headers(self.settings.token_file)
            except OSError as e:
                raise UploadError(f"cannot read the token file: {e}") from None
            self._client = httpx.Client(
                base_url=self.settings.collector_url,
                timeout=self.settings.http_timeout_s,
                headers=headers,
                **client_options(self.settings),
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            # our clock at sending: the collector records the offset between its clock and ours
            resp = self.client().post(path, json=body, headers={SENT_TS_HEADER: repr(time.time())})
        except httpx.HTTPError as e:
            raise UploadError(f"{path}: {type(e).__name__}: {e}") from None
        if resp.status_code in (401, 403):
            self.close()  # the next try re-reads the token file (a rotated token needs no restart)
            raise UploadError(f"{path}: collector refused the token ({resp.status_code})")
        if resp.status_code >= 500:
            raise UploadError(f"{path}: collector error {resp.status_code}")
        return resp

    def _send_results(self) -> bool:
        rows = self.spool.pending_results(self.batch)
        if not rows:
            return False
        resp = self._post("/api/v1/results", {"host": self.host, "results": rows})
        if resp.status_code == 200:
            self.spool.mark_uploaded(r["id"] for r in rows)
            if self.metrics:
                self.metrics.uploaded.inc(resp.json().get("accepted", 0))
            self.batch = min(self.settings.upload_batch, self.batch * 2)
        elif resp.status_code in (413, 422) and len(rows) > 1:
            self.batch = max(1, len(rows) // 2)
        elif resp.status_code == 422:
            reason = refusal(resp)
            log.error("collector rejected result %s: %s", rows[0]["id"], reason)
            self.spool.reject(rows, reason)
            self._count_error()
        else:
            raise UploadError(f"/api/v1/results: unexpected status {resp.status_code}")
        return True

    def _send_statuses(self) -> bool:
        pending = self.spool.pending_statuses()
        for seq, scan_id, body in pending:
            problem = scan_id_problem(scan_id)
            if problem:  # never a path built from an unsafe id (a state spooled by an older agent)
                log.error("state %s not sent: %s", body.get("state"), problem)
                self._count_error()
                self.spool.mark_status_sent(seq)
                continue
            if body["state"] != "running":
                body = self._with_refusals(scan_id, body)
            resp = self._post(f"/api/v1/scans/{scan_id}/status", body)
            if resp.status_code >= 400:
                log.error("collector refused state %s of scan %s: %s", body["state"], scan_id, resp.text[:200])
                self._count_error()
            self.spool.mark_status_sent(seq)
        return bool(pending)

    def _with_refusals(self, scan_id: str, body: dict) -> dict:
        """A final state, made ``failed`` with the collector's reason when it refused rows of the scan."""
        n, reason = self.spool.rejected_for(scan_id)
        if not n:
            return body
        refused = f"the collector refused {n} result(s) of this scan: {reason}"
        error = f"{body['error']}; {refused}" if body.get("error") else refused
        return {**body, "state": "failed", "error": error[:4000]}

    def flush_once(self) -> bool:
        """Send one batch of results, or (when none are left) the pending scan states."""
        if self._send_results():
            return True
        return self._send_statuses()

    def flush(self, stop_after_s: float) -> bool:
        """Send until the spool is empty or an error; True when it emptied. Used at shutdown."""
        end = time.monotonic() + stop_after_s
        try:
            while time.monotonic() < end:
                if not self.flush_once():
                    return True
        except UploadError as e:
            log.warning("final upload stopped: %s", e)
        return False

    def _count_error(self) -> None:
        if self.metrics:
            self.metrics.errors.labels("upload").inc()

    def run(self, stop: threading.Event) -> None:
        """The upload thread: send while there is work; back off exponentially on failure."""
        delay = self.settings.backoff_initial_s
        while not stop.is_set():
            try:
                busy = self.flush_once()
            except Exception as e:  # noqa: BLE001 - any failure: counted, one line, retried; never a dead thread
                # ValueError: a reply that is not JSON; anything else unexpected (a reply of the wrong shape)
                if not isinstance(e, (UploadError, ValueError, sqlite3.Error)):
                    e = f"{type(e).__name__}: {e}"
                if isinstance(e, sqlite3.Error) and self.metrics:
                    self.metrics.errors.labels("spool").inc()
                else:
                    self._count_error()
                log.warning("upload failed (%s); retrying in %.1f s", e, delay)
                stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(self.settings.backoff_max_s, delay * 2)
                continue
            delay = self.settings.backoff_initial_s
            if self.metrics:
                self.metrics.spooled.set(self.spool.count())
            if not busy:
                self.wake.wait(timeout=5.0)
                self.wake.clear()
