"""AnalysisConfig: every threshold of the analysis engine, as data (frozen, validated once).

Defaults were chosen with ``benchmarks/detection.py`` (see docs/analysis.md): a straggler is a device
that slows any synchronous job it joins by at least ``min_effect`` (4%), decided relative to that
threshold, so normal silicon of a fleet spread up to ~1.7% is not flagged while a 5% straggler is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnalysisConfig:
    # A device is a straggler when its deficit (1 - value / peer median) is above ``min_effect`` (T)
    # with confidence: the test "deficit <= T" is rejected at false-discovery rate ``fdr``
    # (Benjamini-Hochberg over every device and probe analysed together) ...
    fdr: float = 0.01
    min_effect: float = 0.04
    # ... it is clearly not one when "deficit >= T" is rejected at level ``clear_level`` (one-sided,
    # per device); otherwise it is ``undecided`` (re-measure), with the samples that would decide it.
    clear_level: float = 0.05
    # ``slow``: credibly more than ``slow_sigmas`` healthy spreads (robust, net of measurement noise)
    # below its peer group's centre, but not above T (BH at ``fdr`` as well).
    slow_sigmas: float = 2.5
    # ``degraded`` (own history, relative to peers): a change point in the device's per-scan ratio to
    # its peers, significant at ``fdr`` (BH) and a loss of at least ``min_change`` since it.
    min_change: float = 0.025
    # Peer groups smaller than ``min_group`` devices (2-3 by default) are decided leave-one-out from
    # the samples, against the larger ``min_effect_few``: with one or two peers the healthy spread
    # between devices cannot be estimated, so only a deficit well beyond it counts. (Two idle cores
    # of this project's shared 2-core VM differed by up to 7.5% in matmul under background load;
    # a core shared with a busy process runs 30-50% slower.)
    min_group: int = 4
    min_effect_few: float = 0.10
    # A sample further than ``dip_sigmas`` pooled noise scales from its device's median is a
    # transient (a dip or a spike) and left out of that device's estimate.
    dip_sigmas: float = 4.0
    # Prior degrees of freedom given to the pooled per-sample noise when a device's own noise is
    # estimated from few samples (moderated variance, as in limma).
    prior_df: float = 8.0
    # Peers must also share these columns where they are present (missing values match each other).
    peer_columns: tuple[str, ...] = ("power_limit_w", "driver")
    # Job sizes N for the fleet cost: expected step-time gain of an N-device synchronous job when
    # the flagged devices are left out.
    job_sizes: tuple[int, ...] = (8, 64, 512, 4096)
    # Reference values "MODEL|PROBE=VALUE" (or "MODEL|PROBE|SETTINGS=VALUE"), used for a device
    # without peers. Empty by default: straggler ships no per-SKU floors.
    references: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.fdr < 1:
            out.append(f"fdr: must be between 0 and 1, got {self.fdr}")
        if not 0 < self.clear_level < 1:
            out.append(f"clear_level: must be between 0 and 1, got {self.clear_level}")
        if self.slow_sigmas <= 0:
            out.append(f"slow_sigmas: must be positive, got {self.slow_sigmas}")
        for name in ("min_effect", "min_effect_few", "min_change"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                out.append(f"{name}: must be in [0, 1), got {v}")
        if self.min_group < 2:
            out.append(f"min_group: must be at least 2, got {self.min_group}")
        if self.dip_sigmas <= 0:
            out.append(f"dip_sigmas: must be positive, got {self.dip_sigmas}")
        if self.prior_df < 0:
            out.append(f"prior_df: must be >= 0, got {self.prior_df}")
        if any(n < 2 for n in self.job_sizes):
            out.append(f"job_sizes: every size must be at least 2, got {list(self.job_sizes)}")
        for item in self.references:
            key, _, value = item.rpartition("=")
            try:
                ok = key.count("|") in (1, 2) and float(value) > 0
            except ValueError:
                ok = False
            if not ok:
                out.append(f"references: {item!r} is not MODEL|PROBE[|SETTINGS]=POSITIVE_NUMBER")
        return out

    def reference_map(self) -> dict[str, float]:
        """{"model|probe[|settings]": value}"""
        return {k.strip(): float(v) for k, _, v in (r.rpartition("=") for r in self.references)}
