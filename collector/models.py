"""Request and response bodies of the collector API (pydantic; they make the OpenAPI spec).

Validation is strict: unknown fields are refused, required columns must be present, numbers must
be finite. A NaN (what pandas writes for a missing cell) in an optional column means "missing"
and becomes null; in ``value`` it is an error.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, create_model
from typing_extensions import NotRequired, Required, TypedDict

from straggler.records import (
    COLUMNS,
    INT_COLUMNS,
    PROBE_COLUMNS,
    PROBES,
    REQUIRED_COLUMNS,
    STRING_COLUMNS,
    read_throttle,
)
from straggler.scanproto import DEFAULT_START_DELAY_S, MAX_DURATION_S, MAX_START_DELAY_S


def _nan_is_missing(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


Missing = BeforeValidator(_nan_is_missing)
Name = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[^\x00-\x1f\x7f]+$")]


@lru_cache(maxsize=4096)  # a fleet's cells repeat: each distinct one is read once
def _readable_throttle(text: str) -> str:
    """A ``throttle_reasons`` cell the result table reads (``records.read_throttle``, every form:
    ``name=share;...``, bit masks, names joined by ``|`` ``,`` ``;``); names it does not know are
    counted by the analysis in ``dropped``, not refused here. ValueError (a 422) otherwise."""
    read_throttle(text)
    return text


def _throttle_text(v: Any) -> Any:
    """An integer bit mask (NVML/DCGM) is stored as its decimal text, which reads back the same."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


ResultId = Annotated[str, Field(pattern=r"^[0-9A-Za-z_-]{8,64}$", description="records.result_id(row)")]


def _column_type(name: str) -> Any:
    if name in REQUIRED_COLUMNS:
        if name == "value":
            return Annotated[float, Field(ge=0, allow_inf_nan=False, description="higher is better")]
        return Name
    if name == "throttle_reasons":
        inner: Any = Annotated[
            str,
            BeforeValidator(_throttle_text),
            AfterValidator(_readable_throttle),
            Field(
                max_length=1024,
                description="any form straggler.records.read_throttle reads: name=share;..., an "
                "NVML/DCGM bit mask, reason names joined by | , ;",
            ),
        ]
    elif name in STRING_COLUMNS:
        inner = Annotated[str, Field(max_length=1024)]
    elif name in INT_COLUMNS:
        inner = Annotated[int, Field(ge=0, le=2**63 - 1)]  # SQLite's INTEGER range
    elif name in ("ts", "duration_s") or name in PROBE_COLUMNS:
        inner = Annotated[float, Field(ge=0, allow_inf_nan=False)]
    else:
        inner = Annotated[float, Field(allow_inf_nan=False)]
    return Annotated[Optional[inner], Missing]


_fields: dict[str, Any] = {"id": (ResultId, ...)}
for _c in COLUMNS:
    _fields[_c] = (_column_type(_c), ... if _c in REQUIRED_COLUMNS else None)

ResultRow = create_model(
    "ResultRow",
    __config__=ConfigDict(extra="forbid"),
    __doc__="One sample: the canonical result columns (straggler/records.py) plus its id.",
    **_fields,
)


class ResultBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: Name = Field(description="the uploading host (an upload does not make it an agent that scans wait on)")
    results: list[ResultRow]  # type: ignore[valid-type]


def _as_typeddict(model: type[BaseModel], name: str) -> Any:
    """The same fields and rules as ``model``, validated into plain dicts (no model instances)."""
    ann = {}
    for field, info in model.model_fields.items():
        tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        ann[field] = Required[tp] if info.is_required() else NotRequired[tp]
    td = TypedDict(name, ann)  # type: ignore[misc]
    td.__pydantic_config__ = model.model_config  # extra="forbid"
    return td


_RowDict = _as_typeddict(ResultRow, "ResultRowDict")


class _BatchDict(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    host: Name
    results: list[_RowDict]  # type: ignore[valid-type]


# Ingest validates raw JSON bytes straight into dicts: about twice as fast as json.loads followed
# by ResultBatch (which documents the same body in the OpenAPI spec).
BATCH_ADAPTER: TypeAdapter = TypeAdapter(_BatchDict)


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int


def _known_probe(name: str) -> str:
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}; choose from {', '.join(PROBES)}")
    return name


ProbeName = Annotated[str, AfterValidator(_known_probe), Field(json_schema_extra={"enum": list(PROBES)})]


class ScanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    probes: list[ProbeName] = Field(min_length=1, max_length=16)
    duration_s: float = Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)
    hosts: Optional[Annotated[list[Name], Field(min_length=1, max_length=100_000)]] = Field(
        default=None, description="null: every agent seen recently"
    )
    start_delay_s: float = Field(default=DEFAULT_START_DELAY_S, ge=0, le=MAX_START_DELAY_S, allow_inf_nan=False)


class ScanCreated(BaseModel):
    scan_id: str
    start_at: float
    probes: list[str]
    duration_s: float
    hosts: list[str]


NodeState = Literal["pending", "running", "done", "failed"]


class ScanView(ScanCreated):
    state: Literal["pending", "running", "done", "failed"]
    nodes: dict[str, NodeState]
    errors: dict[str, str]
    results: int


class ScanList(BaseModel):
    scans: list[ScanView] = Field(description="newest first")


class ScanStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: Name
    state: Literal["running", "done", "failed"]
    error: Optional[str] = Field(default=None, max_length=4000)
