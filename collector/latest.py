"""The samples of each device's latest scan, kept in the analysis process between refreshes.

A refresh's input is every sample of each device's latest scan of each probe and settings
(90,000 rows at 10,000 GPUs x 3 probes x 3 samples): read whole, about 0.7 s of SQLite's rows and
0.3 s of turning them into a DataFrame (docs/collector.md, "The latest samples kept too").
:class:`LatestSamples` keeps that DataFrame and follows the process'
:class:`~collector.history.HistoryCache`: after each of its reads, only the devices whose latest
scan that read may have changed (``HistoryCache.touched``: a new scan, more rows of one, a device
read again) have their rows read again; a whole read of the history, a skipped read, or more than a
quarter of the devices touched read them all. Retention's deletion of raw results counts up the
change epoch (collector/retention.py), so the history and these samples are read whole after it.
A read gives the rows :meth:`Store.latest_samples` gives in the same snapshot, perhaps in another
order and with a number column as floats where a whole read has integers (tests/collector/test_history.py
compares them). A device the history does not hold (a writer that does not mark its rows, such as
a replica of an older version) fails the read and resets the history: the next read is whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .store import KEYS_PER_READ, PAST_CHUNK_ROWS, RESULT_COLUMNS, sample_frame

SMALL_ROWS = 5000  # rows whose devices are looked up one by one (an index of all keys costs 0.3 s at 100k GPUs)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from .history import HistoryCache
    from .store import Store


class LatestSamples:
    """One process' copy of the latest scans' samples (see the module). Not thread-safe: the fleet
    view reads it from one refresh at a time."""

    def __init__(self) -> None:
        self.frame: pd.DataFrame | None = None
        self.row_key: np.ndarray | None = None  # each row's device (its row in the history's keys)
        self.synced: int | None = None  # HistoryCache.reads this copy was brought up to
        self.last: dict[str, int] = {}  # what the latest read did: whole (0/1), devices read

    def read(self, store: Store, history: HistoryCache) -> pd.DataFrame:
        """The latest samples, inside ``store``'s open snapshot, right after ``history.read`` in it."""
        touched = history.touched
        whole = (
            self.frame is None
            or touched is None
            or self.synced != history.reads - 1
            or len(touched) > max(KEYS_PER_READ, len(history.keys) // 4)
        )
        try:
            if whole:
                self._whole(store, history)
            elif touched:
                self._devices(store, history, sorted(touched))
            else:
                self.last = {"whole": 0, "devices": 0}
        except BaseException:
            self.frame = None  # half applied: the next read is whole
            raise
        self.synced = history.reads
        assert self.frame is not None
        return self.frame

    def _whole(self, store: Store, history: HistoryCache) -> None:
        sql, params = store.fleet_queries(0)["latest"]
        cur = store._reader.execute(sql, params)
        self.frame = sample_frame(iter(lambda: cur.fetchmany(PAST_CHUNK_ROWS), []), RESULT_COLUMNS)
        self.row_key = self._keys(self.frame, history)
        self.last = {"whole": 1, "devices": len(history.keys)}

    def _devices(self, store: Store, history: HistoryCache, rows: list[int]) -> None:
        import numpy as np
        import pandas as pd

        scan = history.cols["scan"][rows, 0]
        named = [history.keys[r] + (history.scan_ids[s],) for r, s in zip(rows, scan) if s >= 0]
        cols, got = store.scan_samples(named, RESULT_COLUMNS)
        new = sample_frame([got], cols)
        assert self.frame is not None and self.row_key is not None
        keep = ~np.isin(self.row_key, np.array(rows, dtype=np.int64))
        before = self.frame.dtypes
        self.frame = pd.concat([self.frame[keep], new], ignore_index=True)
        # numbers joined with a column one side leaves empty (None: object) are numbers again
        obj = pd.api.types.is_object_dtype
        mixed = [c for c in self.frame.columns if obj(self.frame[c]) and not (obj(before[c]) and obj(new[c]))]
        if mixed:
            self.frame[mixed] = self.frame[mixed].infer_objects()
        self.row_key = np.concatenate([self.row_key[keep], self._keys(new, history)])
        self.last = {"whole": 0, "devices": len(rows)}

    @staticmethod
    def _keys(frame: pd.DataFrame, history: HistoryCache) -> np.ndarray:
        """Each row's device as its row in ``history.keys`` (settings '' for none, as there): a
        hashed lookup of the four columns at once for many rows (a Python tuple a row took 0.25 s at
        90,000 rows), one by one for a few."""
        import numpy as np
        import pandas as pd

        settings = frame["settings"].astype(object).where(frame["settings"].notna(), "")
        cols = [frame["host"], frame["gpu"], frame["probe"], settings]
        if len(frame) < SMALL_ROWS:  # a few devices read again: no index of every device's key
            got = np.array([history.index.get(k, -1) for k in zip(*(c.tolist() for c in cols))], dtype=np.int64)
        else:
            rows = pd.MultiIndex.from_arrays(cols)
            got = pd.MultiIndex.from_tuples(history.keys, names=rows.names).get_indexer(rows)
        if (got < 0).any():  # a device the history missed: a writer that does not mark its rows
            history.reset()  # (a replica of an older version): both are read whole next time
            raise RuntimeError(
                f"latest samples: {int((got < 0).sum())} rows of devices the kept history does not hold;"
                " it is read whole at the next refresh"
            )
        return got.astype(np.int64)
