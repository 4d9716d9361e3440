"""The fleet view's history, kept in the analysis process between refreshes (issue 13).

A refresh reads each device's ``scans`` past scans as their per-scan summaries: 600,000 rows at
10,000 GPUs x 3 probes x 20 scans, about 2 s of a 7 s refresh, most of it SQLite's cost per row
whatever the layout (docs/collector.md, "The history kept in the analysis process").
:class:`HistoryCache` reads them once; each later read takes only the ``probe_scans`` rows that
changed since (their change mark, schema version 12) and applies them per device:

- a new latest scan, later than every scan held (a scan of the fleet): the latest moves into the
  history and the oldest leaves it;
- more rows of the latest scan: its time and ``writes`` (its summary is stale until rewritten);
- a replay that changed nothing: nothing;
- anything else (rows of a past scan, two new scans at once, a new device, two scans of one time):
  that device's history is read from the database again.

Then the summaries written since (their change mark too, whoever wrote them: this process after
its analysis, another replica that led meanwhile, a write that failed after some of its chunks)
are put in the slots of their scans.

Retention's deletions count up ``fleet_changes.epoch``: a read that finds another epoch reads it
all again, as does any read that fails half way, and one at least every ``WHOLE_EVERY_S`` (what a
writer that does not mark its rows changed, e.g. a replica of an older version, is then seen). A read returns what :meth:`Store.earlier_scans`
returns in the same snapshot (tests/collector/test_history.py compares them after random changes).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

from .store import (
    _LATEST_NUMBERED,
    _PAST_SCANS,
    _SUMMARY_KEY,
    CURRENT_COLUMNS,
    KEYS_PER_READ,
    PAST_CHUNK_ROWS,
    PastSummaries,
)

if TYPE_CHECKING:
    import numpy as np

    from .store import Store

# The change state of a snapshot: the epoch, and the lowest mark a later change can carry (SQLite:
# the next count; PostgreSQL: the oldest transaction still running, whose rows this snapshot misses).
_STATE = {
    "sqlite": "SELECT epoch, seq + 1 FROM fleet_changes WHERE id = 1",
    "postgresql": "SELECT epoch, pg_snapshot_xmin(pg_current_snapshot())::text::bigint FROM fleet_changes WHERE id = 1",
}
_CHANGED = """SELECT s.host, s.gpu, s.probe, s.settings, s.scan_id, s.last_ts, s.writes, l.scan_id
    FROM probe_scans s LEFT JOIN latest_scans l
    ON l.host = s.host AND l.gpu = s.gpu AND l.probe = s.probe AND l.settings = s.settings
    WHERE s.changed >= ?"""
_CHANGED_SUMMARIES = """SELECT host, gpu, probe, settings, scan_id, ts, model, value, median, writes
    FROM scan_summaries WHERE changed >= ?"""
_SUMMARY_FIELDS = "m.ts, m.model, m.value, m.median, m.writes"
# Each device's latest scan with its summary (of any writes); ``{source}``: all latest scans in the
# order _LATEST_NUMBERED numbers them, or those of the devices named in ``want`` (_WANT).
_LATEST = f"""{{with_}} SELECT l.host, l.gpu, l.probe, l.settings, l.scan_id, s.last_ts, s.writes, {_SUMMARY_FIELDS}
    FROM {{source}} LEFT JOIN probe_scans s
    ON s.host = l.host AND s.gpu = l.gpu AND s.probe = l.probe AND s.settings = l.settings AND s.scan_id = l.scan_id
    LEFT JOIN scan_summaries m ON {_SUMMARY_KEY.format(t="l")} {{order}}"""
_ALL_LATEST = {"with_": "", "source": "latest_scans l", "order": "ORDER BY l.host, l.gpu, l.probe, l.settings"}
_WANT = "WITH want (host, gpu, probe, settings) AS (VALUES {values})"
_WANT_SOURCE = """want w {join} latest_scans l
    ON l.host = w.host AND l.gpu = w.gpu AND l.probe = w.probe AND l.settings = w.settings"""
# The past scans (store._PAST_SCANS) with their summaries (of any writes), named by ``{device}``.
_PAST = f"""{{past}} SELECT {{device}}, k.scan_id, k.last_ts, k.writes, {_SUMMARY_FIELDS}
    FROM k LEFT JOIN scan_summaries m ON {_SUMMARY_KEY.format(t="k")}"""
_WANT_LATEST = (
    """want (host, gpu, probe, settings) AS (VALUES {values}), l AS (
    SELECT 0 AS lid, l.host, l.gpu, l.probe, l.settings, l.scan_id FROM """
    + _WANT_SOURCE
    + ")"
)

# Per device (row) and slot (0: the latest scan, 1...: the past ones, latest first): the scan and its
# probe_scans time and writes, and its summary (NaN / -1 where none).
_EMPTY: dict[str, Any] = {
    "scan": -1,
    "scan_ts": float("nan"),
    "writes": -1,
    "ts": float("nan"),
    "model": -1,
    "value": float("nan"),
    "median": float("nan"),
    "summary_writes": -2,
}
WHOLE_EVERY_S = 3600.0  # the longest a kept history goes without a whole read
SCAN_IDS_SLACK = 1000  # scan ids kept beyond twice the slots before the unused are forgotten
_INT = ("scan", "writes", "model", "summary_writes")  # as int32: 4 bytes a slot (a scan takes far fewer batches)


class HistoryCache:
    """One process' copy of the fleet's history (see the module). Not thread-safe: the fleet view
    reads it from one refresh at a time."""

    def __init__(self) -> None:
        self.reads = 0  # reads that succeeded, ever (collector/latest.py follows them); kept by reset()
        self.reset()

    def reset(self) -> None:
        self.scans: int | None = None  # the history length held
        self.mark: int | None = None  # changes with a mark from this on are not applied yet
        self.epoch: int | None = None
        self.keys: list[tuple] = []  # (host, gpu, probe, settings), settings '' for none
        self.index: dict[tuple, int] = {}
        self.scan_ids: list[str] = []
        self._scan_code: dict[str, int] = {}
        self.models: list = []
        self._model_code: dict = {}
        self.cols: dict[str, np.ndarray] = {}
        self.last: dict[str, int] = {}  # what the latest read did: whole (0/1), changed, reread, summaries
        # the rows (into keys) whose latest scan the latest read may have changed; None: any (whole)
        self.touched: set[int] | None = None
        self.whole_at = float("-inf")  # time.monotonic() of the latest whole read

    # -- reading ----------------------------------------------------------------------------

    def read(self, store: Store, scans: int) -> tuple[PastSummaries, tuple[list[str], list[tuple]]]:
        """The history as :meth:`Store.earlier_scans` gives it, inside ``store``'s open snapshot."""
        if scans <= 0:
            return store._earlier_scans(scans)
        epoch, mark = store._reader.execute(_STATE[store.dialect.name]).fetchone()
        try:
            stale = time.monotonic() - self.whole_at > WHOLE_EVERY_S
            if scans != self.scans or epoch != self.epoch or self.mark is None or stale:
                self._whole(store, scans)
            else:
                self._changes(store, self.mark)
            past, unsummarised = self._past()
            samples = store.scan_samples(unsummarised)
        except BaseException:
            self.reset()  # half applied: the next read is whole
            raise
        self.mark, self.epoch = mark, epoch
        self._compact()
        self.reads += 1
        return past, samples

    def _whole(self, store: Store, scans: int) -> None:
        import numpy as np

        self.reset()
        self.scans, self.whole_at = scans, time.monotonic()
        latest = store._reader.execute(_LATEST.format(**_ALL_LATEST)).fetchall()
        self._add_keys([tuple(r[:4]) for r in latest])
        self._fill_latest(np.arange(len(latest)), latest)
        past = _PAST_SCANS[store.dialect.name].format(latest=_LATEST_NUMBERED)
        cur = store._reader.execute(_PAST.format(past=past, device="k.lid"), (scans,))
        parts = []
        while chunk := cur.fetchmany(PAST_CHUNK_ROWS):
            parts.append(self._past_columns(np.array([r[0] for r in chunk], dtype=np.int64), chunk, 1))
        self._fill_past(parts)
        self.last = {"whole": 1, "changed": 0, "reread": len(self.keys), "summaries": 0}

    def _reread(self, store: Store, keys: list[tuple]) -> None:
        """Read the history of ``keys`` from the database again (new devices are added)."""
        import numpy as np

        self._add_keys([k for k in keys if k not in self.index])
        rows = np.array([self.index[k] for k in keys], dtype=np.int64)
        for name, a in self.cols.items():
            a[rows] = _EMPTY[name]
        join = store.dialect.ordered_join
        parts = []
        for i in range(0, len(keys), KEYS_PER_READ):
            chunk = keys[i : i + KEYS_PER_READ]
            values = ", ".join("(?, ?, ?, ?)" for _ in chunk)
            params = [v for k in chunk for v in k]
            sql = _LATEST.format(with_=_WANT.format(values=values), source=_WANT_SOURCE.format(join=join), order="")
            got = store._reader.execute(sql, params).fetchall()
            self._fill_latest(np.array([self.index[tuple(r[:4])] for r in got], dtype=np.int64), got)
            past = _PAST_SCANS[store.dialect.name].format(latest=_WANT_LATEST.format(values=values, join=join))
            sql = _PAST.format(past=past, device="k.host, k.gpu, k.probe, k.settings")
            got = store._reader.execute(sql, params + [self.scans]).fetchall()
            if got:
                idx = np.array([self.index[tuple(r[:4])] for r in got], dtype=np.int64)
                parts.append(self._past_columns(idx, got, 4))
        self._fill_past(parts)

    def _changes(self, store: Store, mark: int) -> None:
        """Apply the probe_scans rows marked ``mark`` or later (see the module)."""
        import numpy as np

        changed = store._reader.execute(_CHANGED, (mark,)).fetchall()
        reread: set[tuple] = set()
        first: dict[tuple, tuple] = {}
        for r in changed:
            key = tuple(r[:4])
            if key in first or key not in self.index:
                reread.add(key)
            else:
                first[key] = r
        for key in reread:
            first.pop(key, None)
        if first:
            c = self.cols
            rows = np.array([self.index[k] for k in first], dtype=np.int64)
            got = list(first.values())
            scan = np.array([self._code(r[4]) for r in got], dtype=np.int64)
            ts = np.array([np.nan if r[5] is None else r[5] for r in got], dtype=float)
            writes = np.array([r[6] for r in got], dtype=np.int64)
            latest = np.array([-3 if r[7] is None else self._code(r[7]) for r in got], dtype=np.int64)
            held, held_ts = c["scan"][rows], c["scan_ts"][rows]
            now = held[:, 0]
            found = held == scan[:, None]
            slot = found.argmax(axis=1)
            pick = np.arange(len(rows))
            ordered = np.all((held_ts[:, :-1] > held_ts[:, 1:]) | (held[:, 1:] < 0), axis=1)
            more = (now == scan) & (latest == scan) & (ts >= held_ts[:, 0])
            new = (latest == scan) & ~found.any(axis=1) & (now >= 0) & (ts > held_ts[:, 0]) & ordered
            same = (
                (latest == now)
                & (slot > 0)
                & found[pick, slot]
                & (held_ts[pick, slot] == ts)
                & (c["writes"][rows, slot] == writes)
            )
            m = rows[more]
            c["scan_ts"][m, 0], c["writes"][m, 0] = ts[more], writes[more]
            s = rows[new]
            for name, a in c.items():
                a[s, 1:] = a[s, :-1]
                a[s, 0] = _EMPTY[name]
            c["scan"][s, 0], c["scan_ts"][s, 0], c["writes"][s, 0] = scan[new], ts[new], writes[new]
            reread.update(self.keys[i] for i in rows[~(more | new | same)])
            touched = set(rows[more | new].tolist())
        else:
            touched = set()
        if len(reread) > max(KEYS_PER_READ, len(self.keys) // 4):
            self._whole(store, self.scans)  # cheaper in one read
            self.last["changed"] = len(changed)
            return
        if reread:
            self._reread(store, sorted(reread))
        self.touched = touched | {self.index[k] for k in reread}
        summaries = store._reader.execute(_CHANGED_SUMMARIES, (mark,)).fetchall()
        self._take_summaries(summaries)
        self.last = {"whole": 0, "changed": len(changed), "reread": len(reread), "summaries": len(summaries)}

    def _take_summaries(self, got: list[tuple]) -> None:
        """Put summaries (_CHANGED_SUMMARIES' tuples) in the slots of their scans (those of scans
        not held: nothing; a device read again already has its own)."""
        import numpy as np

        mine = [(self.index.get(tuple(r[:4])), self._scan_code.get(r[4]), r) for r in got]
        mine = [m for m in mine if m[0] is not None and m[1] is not None]
        if not mine:
            return
        c = self.cols
        rows = np.array([i for i, _, _ in mine], dtype=np.int64)
        found = c["scan"][rows] == np.array([code for _, code, _ in mine], dtype=np.int64)[:, None]
        held = found.any(axis=1)
        rows, slot = rows[held], found.argmax(axis=1)[held]
        self._put_summaries(rows, slot, [r for (_, _, r), h in zip(mine, held) if h], 5)

    def current(self) -> dict[str, Any]:
        """Each device's latest scan with the summary held of it, as :meth:`Store.fleet_input`'s
        ``current`` (columns of ``CURRENT_COLUMNS``; NaN / None where no summary): what the latest
        :meth:`read` brought up to date, so the fleet view reads none of it from the database."""
        import numpy as np

        c = self.cols
        if not self.keys:
            return {name: [] for name in CURRENT_COLUMNS}
        rows = np.flatnonzero(c["writes"][:, 0] >= 0)  # a latest scan with its probe_scans row
        keys = list(zip(*(self.keys[i] for i in rows))) or [(), (), (), ()]
        text = {name: np.array(keys[i], dtype=object) for i, name in enumerate(("host", "gpu", "probe", "settings"))}
        models = np.array([*self.models, None], dtype=object)  # code -1: none
        return {
            **text,
            "scan_id": np.array(self.scan_ids, dtype=object)[c["scan"][rows, 0]],
            "last_ts": c["scan_ts"][rows, 0],
            "writes": c["writes"][rows, 0].astype(np.int64),
            "value": c["value"][rows, 0],
            "median": c["median"][rows, 0],
            "summary_writes": c["summary_writes"][rows, 0].astype(np.int64),
            "model": models[c["model"][rows, 0]],
        }

    # -- the columns ------------------------------------------------------------------------

    def _compact(self) -> None:
        """Forget the scan ids no slot holds any more (each new scan brings new ones: a long-lived
        process would otherwise keep every scan id it ever saw)."""
        import numpy as np

        scan = self.cols.get("scan")
        if scan is None or len(self.scan_ids) <= 2 * scan.size + SCAN_IDS_SLACK:
            return
        held = scan >= 0
        kept, code = np.unique(scan[held], return_inverse=True)
        scan[held] = code
        self.scan_ids = [self.scan_ids[i] for i in kept]
        self._scan_code = {sid: i for i, sid in enumerate(self.scan_ids)}

    def _code(self, scan_id: str) -> int:
        code = self._scan_code.get(scan_id)
        if code is None:
            code = self._scan_code[scan_id] = len(self.scan_ids)
            self.scan_ids.append(scan_id)
        return code

    def _model(self, model) -> int:
        code = self._model_code.get(model)
        if code is None:
            code = self._model_code[model] = len(self.models)
            self.models.append(model)
        return code

    def _add_keys(self, keys: Sequence[tuple]) -> None:
        import numpy as np

        for k in keys:
            self.index[k] = len(self.keys)
            self.keys.append(k)
        assert self.scans is not None
        shape = (len(keys), self.scans + 1)
        for name, empty in _EMPTY.items():
            add = np.full(shape, empty, dtype=np.int32 if name in _INT else float)
            self.cols[name] = add if name not in self.cols else np.concatenate([self.cols[name], add])

    def _fill_latest(self, rows: np.ndarray, got: list[tuple]) -> None:
        """Slot 0 of ``rows`` from _LATEST's tuples."""
        import numpy as np

        c = self.cols
        c["scan"][rows, 0] = [self._code(r[4]) for r in got]
        c["scan_ts"][rows, 0] = np.array([r[5] for r in got], dtype=float)
        c["writes"][rows, 0] = [-1 if r[6] is None else r[6] for r in got]
        self._put_summaries(rows, 0, got, 7)

    def _put_summaries(self, rows: np.ndarray, slot, got: list[tuple], at: int) -> None:
        """The summaries in ``got``'s tuples (ts, model, value, median, writes from field ``at`` on;
        value None: no summary) into the ``slot`` (a number, or one a row) of ``rows``."""
        import numpy as np

        c = self.cols
        have = np.array([r[at + 2] is not None for r in got], dtype=bool)
        c["ts"][rows, slot] = np.array([r[at] for r in got], dtype=float)
        c["model"][rows, slot] = np.where(have, [self._model(r[at + 1]) for r in got], -1)
        c["value"][rows, slot] = np.array([r[at + 2] for r in got], dtype=float)
        c["median"][rows, slot] = np.array([r[at + 3] for r in got], dtype=float)
        c["summary_writes"][rows, slot] = [-2 if r[at + 4] is None else r[at + 4] for r in got]

    def _past_columns(self, rows: np.ndarray, got: list[tuple], at: int) -> dict[str, np.ndarray]:
        """_PAST's tuples (their fields from ``at`` on) as columns, with the devices' ``rows``."""
        import numpy as np

        has = np.array([r[at + 5] is not None for r in got], dtype=bool)
        return {
            "row": rows,
            "scan": np.array([self._code(r[at]) for r in got], dtype=np.int64),
            "scan_ts": np.array([r[at + 1] for r in got], dtype=float),
            "writes": np.array([r[at + 2] for r in got], dtype=np.int64),
            "ts": np.array([r[at + 3] for r in got], dtype=float),
            "model": np.where(has, [self._model(r[at + 4]) for r in got], -1),
            "value": np.array([r[at + 5] for r in got], dtype=float),
            "median": np.array([r[at + 6] for r in got], dtype=float),
            "summary_writes": np.array([-2 if r[at + 7] is None else r[at + 7] for r in got], dtype=np.int64),
        }

    def _fill_past(self, parts: list[dict[str, np.ndarray]]) -> None:
        """The past slots of the devices in ``parts``, latest first (by their probe_scans time)."""
        import numpy as np

        if not parts:
            return
        col = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        order = np.lexsort((-col["scan_ts"], col["row"]))
        row = col["row"][order]
        start = np.r_[0, np.flatnonzero(np.diff(row)) + 1]
        slot = 1 + np.arange(len(row)) - np.repeat(start, np.diff(np.r_[start, len(row)]))
        keep = slot <= self.scans  # the query's LIMIT already: never more
        for name in _EMPTY:
            self.cols[name][row[keep], slot[keep]] = col[name][order][keep]

    def _past(self) -> tuple[PastSummaries, list[tuple]]:
        """The history's current summaries (as PastSummaries) and the past scans without one."""
        import numpy as np

        c = self.cols
        if not self.keys:
            none = np.zeros(0, dtype=np.int64)
            return PastSummaries([], none, np.zeros(0), none, [], none, [], np.zeros(0), np.zeros(0)), []
        held = c["scan"][:, 1:] >= 0
        current = held & (c["summary_writes"][:, 1:] == c["writes"][:, 1:]) & np.isfinite(c["value"][:, 1:])
        row, slot = np.nonzero(current)
        slot += 1
        scans, scan = np.unique(c["scan"][row, slot], return_inverse=True)
        models, model = np.unique(c["model"][row, slot], return_inverse=True)
        past = PastSummaries(
            keys=[(h, g, p, st or None) for h, g, p, st in self.keys],
            device=row.astype(np.int64),
            ts=c["ts"][row, slot],
            scan=scan.astype(np.int64),
            scan_ids=[self.scan_ids[i] or None for i in scans],
            model=model.astype(np.int64),
            models=[self.models[i] for i in models],
            value=c["value"][row, slot],
            median=c["median"][row, slot],
        )
        row, slot = np.nonzero(held & ~current)
        slot += 1
        missing = [self.keys[r] + (self.scan_ids[s],) for r, s in zip(row, c["scan"][row, slot])]
        return past, missing
