"""Typed, immutable configuration: defaults < TOML file < environment < command-line flags.

A component declares its settings as a frozen dataclass whose fields carry types and defaults, and
optionally a ``problems(self) -> list[str]`` method for range checks. :func:`load` validates once and
lists every bad key in one :class:`~straggler.errors.ConfigError`. Nothing is ever ``eval``ed.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``pathlib.Path``, ``tuple[str, ...]``,
``tuple[int, ...]``, and ``X | None`` of those.

One rule for every number, whatever the component: a ``float`` must be finite (NaN and infinities
are refused), and a field in seconds (its name ends in ``_s``) at most :data:`MAX_SECONDS`, so no
timer, socket timeout or ``sleep`` ever overflows. A problem names where the value came from: the
file (when one was read), the ``{env_prefix}{FIELD}`` variable, or the command-line option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sqlite3
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")
D = TypeVar("D")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MAX_SECONDS = 366 * 24 * 3600.0  # a year: longer than any interval, timeout or deadline of ours


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, from_text: bool) -> Any:
    """Convert ``value`` to ``tp`` or raise ValueError with a short reason."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (from_text and optional and value == ""):
        if optional:
            return None
        raise ValueError("must be set")
    if typing.get_origin(tp) is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return tuple(_coerce(item_tp, v, from_text) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {value!r}")
        return number
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"expected a path, got {value!r}")
        return Path(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in the dataclass, not user input


def load(
    cls: type[T],
    path: str | Path | None = None,
    *,
    env_prefix: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    required_file: bool = False,
    option_names: Mapping[str, str] | None = None,
) -> T:
    """Build a validated ``cls`` from defaults, the TOML file, ``{env_prefix}{FIELD}`` variables and
    ``overrides`` (flags; ``None`` values are ignored; ``option_names`` maps a field to the option
    that set it, e.g. ``interval_s`` to ``--interval``). Raises ConfigError listing every problem,
    each naming its source; the message starts with the file only when a file was read."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls))}
    problems: list[str] = []
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # field -> the env variable or option that set it (a file's keys: none)
    source = "config"
    failed: set[str] = set()  # keys whose value had the wrong type (their defaults stand in for the range checks)

    def take(key: str, raw: Any, label: str, from_text: bool) -> None:
        try:
            value = _coerce(hints[key], raw, from_text)
            if key.endswith("_s") and isinstance(value, (int, float)) and value > MAX_SECONDS:
                raise ValueError(f"must be at most {MAX_SECONDS:.0f} s (a year), got {raw!r}")
        except ValueError as e:
            problems.append(f"{label}: {e}")
            failed.add(key)
            return
        values[key] = value
        failed.discard(key)
        if label == key:
            origin.pop(key, None)
        else:
            origin[key] = label

    if path is not None:
        p = Path(path)
        if p.is_file():
            source = str(p)
            try:
                data = tomllib.loads(p.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError([f"not valid TOML: {e}"], source) from None
            for key, raw in data.items():
                if key not in fields:
                    problems.append(f"unknown key {key!r}")
                    continue
                take(key, raw, key, from_text=False)
        elif required_file:
            raise ConfigError(["file not found"], str(p))

    env = os.environ if env is None else env
    if env_prefix:
        for name in fields:
            var = f"{env_prefix}{name.upper()}"
            if var in env:
                take(name, env[var], var, from_text=True)

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in fields:
            problems.append(f"unknown option {key!r}")
            continue
        take(key, raw, (option_names or {}).get(key) or f"--{key.replace('_', '-')}", from_text=isinstance(raw, str))

    # the range checks run even after a type error (on the defaults of the fields that had one), so
    # that one wrong type does not hide the other problems; none is reported twice for a key
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:  # a dataclass that checks in __post_init__
        problems.append(str(e))
        cfg = None
    check = getattr(cfg, "problems", None)
    for p in check() if callable(check) else []:
        if p.split(":", 1)[0].split(" ", 1)[0] not in failed:
            problems.append(_from(p, origin))
    if not problems and cfg is not None:
        return cfg
    raise ConfigError(problems, source)


def _from(problem: str, origin: Mapping[str, str]) -> str:
    """``key: why`` as ``key (from VAR): why`` when an env variable or an option set ``key``."""
    key, sep, why = problem.partition(":")
    if sep and key in origin:
        return f"{key} (from {origin[key]}):{why}"
    return problem


def option_names(params) -> dict[str, str]:
    """Field name -> its command-line option (the longest spelling), from a click command's params."""
    return {p.name: max(p.opts, key=len) for p in params if getattr(p, "opts", None)}


def render(cfg: Any, as_json: bool = False) -> str:
    """A loaded config as text for ``--check``: ``key = value`` lines, or a JSON object."""
    import json

    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    data = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in data.items()}
    if as_json:
        return json.dumps(data, indent=2)
    return "\n".join(f"{k} = {v!r}" for k, v in data.items())


def _sqlite_path_problem(key: str, path: Path) -> str | None:
    """A clear reason SQLite could not open (or create) ``path``, found without writing; None when
    none is seen (the real open may still fail: :func:`open_sqlite` then reports SQLite's reason)."""
    if path.exists():
        if path.is_dir():
            return f"{key}: {path} is a directory"
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            return f"{key}: {path} (or its directory, for the WAL files) is not writable by this user"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{key}: cannot create {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{key}: cannot create {path}: {parent} is not writable by this user"
    return None


def open_sqlite(key: str, path: Path, opener: Callable[[Path], D]) -> D:
    """``opener(path)`` (the component's own database class: it creates the directories, the file,
    the schema), or a one-line ConfigError naming ``key`` and why. The start opens with this."""
    path = Path(path)
    problem = _sqlite_path_problem(key, path)
    if problem:
        raise ConfigError([problem])
    try:
        return opener(path)
    except (sqlite3.Error, OSError, RuntimeError) as e:  # RuntimeError: a schema newer than this code
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError([f"{key}: {path} cannot be opened as an SQLite database ({why})"]) from None


def check_sqlite(key: str, path: Path, opener: Callable[[Path], Any], latest_version: int | None = None) -> None:
    """What ``--check`` runs: :func:`open_sqlite` for real, then close it and remove the file and
    the directories it created. A database that exists is only read (never migrated: a running
    older service may still use it): it must open as SQLite, and its schema version (``PRAGMA
    user_version``) must not be newer than ``latest_version``, as the start would refuse it."""
    path = Path(path)
    if path.is_file():
        problem = _sqlite_path_problem(key, path)
        if problem:
            raise ConfigError([problem])
        try:
            with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                found = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as e:
            raise ConfigError([f"{key}: {path} cannot be opened as an SQLite database ({e})"]) from None
        if latest_version is not None and found > latest_version:
            raise ConfigError(
                [
                    f"{key}: {path} cannot be opened as an SQLite database (database schema version "
                    f"{found} is newer than this program ({latest_version}))"
                ]
            )
        return
    # the WAL files only with a database created here: beside an existing one they may be another
    # process's (SQLite removes its own at the last close)
    created = [] if path.exists() else [path.with_name(path.name + s) for s in ("", "-wal", "-shm", "-journal")]
    dirs = [d for d in path.parents if not d.exists()]  # deepest first
    try:
        open_sqlite(key, path, opener).close()
    finally:
        for p in created:
            if p.is_file():
                p.unlink()
        for d in dirs:
            try:
                d.rmdir()
            except OSError:
                break
