"""straggler.analysis: pure statistics on the canonical result table (DataFrames in, DataFrames out).

    from straggler.analysis import analyze, AnalysisConfig
    res = analyze(samples_df, history=None, config=AnalysisConfig())

Importing this package loads neither pandas nor numpy nor scipy: ``analyze`` imports the engine
on first use, so the CLI and the agent stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import AnalysisConfig

if TYPE_CHECKING:  # pragma: no cover
    from .result import AnalysisResult


def analyze(samples, history=None, config: AnalysisConfig | None = None) -> "AnalysisResult":
    """Find stragglers; see :func:`straggler.analysis.engine.analyze`."""
    from .engine import analyze as run

    return run(samples, history, config)


__all__ = ["AnalysisConfig", "analyze"]
