"""Reading the collector's bearer token from its file: the one function the agent, the collector and
the CLI commands use, with one error style. Importing it loads nothing."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


def read_token(path: str | Path, what: str = "--token-file") -> str:
    """The token in ``path`` (surrounding whitespace stripped). ``what`` names where the path came
    from in the error (``--token-file``, the config key ``token_file``). InputError, one line
    ``<what>: cannot read <path>: <why>`` / ``<what>: <path> is empty`` / ``<what>: <path> holds
    characters other than printable ASCII ...`` when the file cannot be read, holds nothing or holds
    what an HTTP header cannot carry."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise InputError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{what}: cannot read {path}: not UTF-8 text") from None
    if not token:
        raise InputError(f"{what}: {path} is empty")
    if not token.isascii() or not token.isprintable():
        raise InputError(
            f"{what}: {path} holds characters other than printable ASCII (an HTTP header cannot carry them)"
        )
    return token
