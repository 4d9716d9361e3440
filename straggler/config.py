"""Typed, immutable configuration: defaults < TOML file < environment < command-line flags.

A component declares its settings as a frozen dataclass whose fields carry types and defaults, and
optionally a ``problems(self) -> list[str]`` method for range checks. :func:`load` validates once and
lists every bad key in one :class:`~straggler.errors.ConfigError`. Nothing is ever ``eval``ed.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``pathlib.Path``, ``tuple[str, ...]``,
``tuple[int, ...]``, and ``X | None`` of those.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


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
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
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
) -> T:
    """Build a validated ``cls`` from defaults, the TOML file, ``{env_prefix}{FIELD}`` variables and
    ``overrides`` (flags; ``None`` values are ignored). Raises ConfigError listing every problem."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems: list[str] = []
    values: dict[str, Any] = {}
    source = str(path) if path else "config"

    if path is not None:
        p = Path(path)
        if p.is_file():
            try:
                data = tomllib.loads(p.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError([f"not valid TOML: {e}"], source) from None
            for key, raw in data.items():
                if key not in fields:
                    problems.append(f"unknown key {key!r}")
                    continue
                try:
                    values[key] = _coerce(hints[key], raw, from_text=False)
                except ValueError as e:
                    problems.append(f"{key}: {e}")
        elif required_file:
            raise ConfigError(["file not found"], source)

    env = os.environ if env is None else env
    if env_prefix:
        for name in fields:
            var = f"{env_prefix}{name.upper()}"
            if var in env:
                try:
                    values[name] = _coerce(hints[name], env[var], from_text=True)
                except ValueError as e:
                    problems.append(f"{var}: {e}")

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in fields:
            problems.append(f"unknown option {key!r}")
            continue
        try:
            values[key] = _coerce(hints[key], raw, from_text=isinstance(raw, str))
        except ValueError as e:
            problems.append(f"--{key.replace('_', '-')}: {e}")

    if not problems:
        cfg = cls(**values)
        check = getattr(cfg, "problems", None)
        problems.extend(check() if callable(check) else [])
        if not problems:
            return cfg
    raise ConfigError(problems, source)


def render(cfg: Any, as_json: bool = False) -> str:
    """A loaded config as text for ``--check``: ``key = value`` lines, or a JSON object."""
    import json

    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    data = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in data.items()}
    if as_json:
        return json.dumps(data, indent=2)
    return "\n".join(f"{k} = {v!r}" for k, v in data.items())


def sqlite_path_problem(key: str, path: Path) -> str | None:
    """Why SQLite could not open (or create) a WAL database at ``path``, found without writing
    anything; None when it can. Used by every ``--check`` and start that opens a database."""
    path = Path(path)
    if path.exists():
        if path.is_dir():
            return f"{key}: {path} is a directory"
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            return f"{key}: {path} (or its directory, for the WAL files) is not writable by this user"
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as e:
            return f"{key}: {path} cannot be opened as an SQLite database ({e})"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{key}: cannot create {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{key}: cannot create {path}: {parent} is not writable by this user"
    return None
