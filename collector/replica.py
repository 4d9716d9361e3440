"""Several collector replicas on one PostgreSQL database: one refreshes the fleet view, the others
serve the snapshot it published (docs/collector.md "PostgreSQL and replicas").

Three narrow parts:

- :class:`Lease`: the refresh leadership, a session advisory lock (``pg_try_advisory_lock``) on a
  connection of its own. It is released when the leader stops, and by the server when the leader's
  connection ends (a crash, a lost network): another replica then takes it within ``poll_s``.
- :class:`SnapshotBoard`: ``publish(payload: bytes) -> version`` (only while the lease is held:
  the write checks the lock in the same statement) and ``latest(after) -> (version, bytes)``. What
  the bytes are is the caller's: today one JSON document of the :class:`FleetSnapshot`.
- :class:`ReplicaFleetView`: the fleet view of a replica. The leader runs the analysis as a lone
  collector does and publishes it; the others never analyse, they adopt each published version
  (a notification wakes them; they also look every ``poll_s``). Results posted to any replica wake
  the leader (``pg_notify`` in the ingest's transaction, collector/store.py).

On SQLite one process is the only mode: the collector uses :class:`FleetView` itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time

from . import db
from .fleet import FleetSnapshot, FleetView, json_safe

log = logging.getLogger("straggler.collector")

POLL_S = 1.0  # how soon a follower sees a publication it was not told about, and takes over a free lease
_FORMAT = 1  # of the JSON payload


class Lease:
    """The fleet refresh's leadership over a shared database. ``try_acquire()`` and ``wait()`` from
    one thread (its connection is its own); ``held`` from any."""

    def __init__(self, store, name: str = "fleet-refresh"):
        self.store, self.name = store, name
        self.conn = None
        self.key: int | None = None
        self.pid: int | None = None  # the server process of the lock's session (the publication's fence)
        self.held = False

    def _connect(self) -> None:
        if self.conn is None:
            self.conn = db.connect_pg(self.store.url)
            self.key = db.advisory_key(self.conn, self.name)
            self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            for channel in self.store.channels.values():
                self.conn.execute(f'LISTEN "{channel}"')

    def try_acquire(self) -> bool:
        self._connect()
        if not self.held:
            self.held = bool(self.conn.execute("SELECT pg_try_advisory_lock(?)", (self.key,)).fetchone()[0])
        return self.held

    def wait(self, timeout_s: float) -> set[str]:
        """The channels notified within ``timeout_s`` (empty: none)."""
        self._connect()
        got = set()
        for n in self.conn.raw.notifies(timeout=timeout_s, stop_after=1):
            got.add(n.channel)
        return got

    def lost(self) -> None:
        """The connection failed: the server released the lock with its session."""
        self.held = False
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 (closing a broken connection)
                pass

    def release(self) -> None:
        if self.conn is not None and self.held:
            try:
                self.conn.execute("SELECT pg_advisory_unlock(?)", (self.key,))
            except self.store.errors:
                pass  # the session goes next, and the lock with it
        self.lost()


class SnapshotBoard:
    """The published fleet snapshot: bytes in, bytes out, a version counted up at each publication."""

    def __init__(self, store):
        self.store = store
        self.publisher = f"{socket.gethostname()}:{os.getpid()}"

    def publish(self, payload: bytes, lease: Lease) -> int | None:
        """Store ``payload`` as the next version, only while ``lease`` holds its lock (checked in the
        same statement: a leader that lost its lease cannot overwrite its successor's snapshot).
        Returns the version, or None when the lease is gone."""
        if lease.pid is None or lease.key is None:
            return None

        def write(conn) -> int | None:
            row = conn.execute(
                "INSERT INTO fleet_snapshot (id, version, published_ts, publisher, payload) "
                "SELECT 1, 1, ?, ?, ? WHERE EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = ? AND ((classid::bigint << 32) | objid::bigint) = ?) "
                "ON CONFLICT (id) DO UPDATE SET version = fleet_snapshot.version + 1, "
                "published_ts = excluded.published_ts, publisher = excluded.publisher, payload = excluded.payload "
                "RETURNING version",
                (time.time(), self.publisher, payload, lease.pid, lease.key),
            ).fetchone()
            if row is not None:
                conn.execute("SELECT pg_notify(?, ?)", (self.store.channels["snapshot"], str(row[0])))
            return None if row is None else row[0]

        return self.store._retrying(write)

    def version(self) -> int:
        row = self.store._reader.execute("SELECT version FROM fleet_snapshot WHERE id = 1").fetchone()
        return 0 if row is None else row[0]

    def latest(self, after: int = 0) -> tuple[int, bytes] | None:
        """The published version and its bytes, when newer than ``after``."""
        if self.version() <= after:
            return None
        row = self.store._reader.execute("SELECT version, payload FROM fleet_snapshot WHERE id = 1").fetchone()
        return None if row is None else (row[0], bytes(row[1]))


def encode(snap: FleetSnapshot) -> bytes:
    fields = {f.name: getattr(snap, f.name) for f in dataclasses.fields(snap)}
    return json.dumps({"format": _FORMAT, "snapshot": json_safe(fields)}, separators=(",", ":")).encode()


def decode(payload: bytes) -> FleetSnapshot:
    doc = json.loads(payload)
    if doc.get("format") != _FORMAT:
        raise ValueError(f"fleet snapshot format {doc.get('format')!r}, this collector reads {_FORMAT}")
    names = {f.name for f in dataclasses.fields(FleetSnapshot)}
    fields = {k: v for k, v in doc["snapshot"].items() if k in names}
    fields["gpus"] = tuple(fields.get("gpus") or ())
    return FleetSnapshot(**fields)


class ReplicaFleetView(FleetView):
    """The fleet view of one replica of a shared database (see the module's docstring). ``role``:
    "leader" or "follower"; ``version``: the publication it serves."""

    def __init__(self, store, *args, poll_s: float = POLL_S, **kw):
        super().__init__(store, *args, **kw)
        self.on_adopt = (
            self.on_refresh
        )  # the metrics' hook; what wraps on_refresh later (the quarantine) is the leader's
        self.poll_s = poll_s
        self.lease = Lease(store)
        self.board = SnapshotBoard(store)
        self.version = 0
        self._adopt_lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    @property
    def role(self) -> str:
        return "leader" if self.lease.held else "follower"

    def start(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="fleet-replica", daemon=True)
        self._watcher.start()
        super().start()

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)  # the refresh thread first: no publication after the lease is gone
        if self._watcher is not None:
            self._watcher.join(timeout_s + self.poll_s)
        self.lease.release()

    def refresh(self) -> FleetSnapshot:
        if not self.lease.held:
            return self.adopt()
        snap = super().refresh()
        version = self.board.publish(encode(snap), self.lease)
        if version is None:
            log.warning("fleet refresh: the lease was lost before publishing; the new leader publishes")
        else:
            self.version = version
        return snap

    def adopt(self) -> FleetSnapshot:
        """Serve the leader's newest publication (the current snapshot when there is none newer)."""
        with self._adopt_lock:
            got = self.board.latest(self.version)
            if got is None:
                return self.snapshot
            version, payload = got
            snap = decode(payload)
            self.snapshot, self.version = snap, version
        if self.on_adopt is not None:
            self.on_adopt(snap)
        return snap

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.lease.held and self.lease.try_acquire():
                    log.info("fleet refresh leader: this replica refreshes the fleet view now")
                    self.notify()  # analyse what arrived while another replica led
                notified = self.lease.wait(self.poll_s)
                if self.lease.held:
                    if self.store.channels["results"] in notified:
                        self.notify()
                else:
                    self.adopt()
            except Exception:  # the database went away: the lock went with the session; try again
                log.exception("fleet replica: lost the database connection; retrying in %g s", self.poll_s)
                self.lease.lost()
                self._stop.wait(self.poll_s)
