"""Batch jobs' typed objects: the OpenAI Batch and File objects, one input line, one committed result,
and the limits a server enforces.

A job's input is a list of ``JobLine``s numbered from 0 (its ``index``); each gets exactly one
``LineResult``, committed once (``JobStore.commit``). Results are numbered in commit order too (their
``seq``, from 0): a client that read results up to ``seq`` N resumes from offset N + 1.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's Batch statuses. Active: the runner still owes work; final: only expiry changes them.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
GRPC_LINE = "dsaserve.v1.GenerateRequest"  # the url of a line given inline through gRPC (body: its JSON form)
FILE_PURPOSES = ("batch", "batch_output")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class JobLimits(BaseModel):
    """What a server accepts and how it runs jobs (``dsaserve local --jobs-*``, Helm ``router.jobs``)."""

    model_config = ConfigDict(extra="forbid")

    max_lines_per_job: int = Field(50_000, ge=1, description="input lines in one job (OpenAI: 50,000)")
    max_file_bytes: int = Field(200 * 2**20, ge=1, description="bytes of one uploaded file (OpenAI: 200 MB)")
    max_jobs_in_flight: int = Field(16, ge=1, description="jobs not yet finished, per server")
    max_line_chars: int = Field(1 << 20, ge=1, description="characters of one input line")
    retention_s: float = Field(7 * 86400.0, gt=0, description="a finished job and its files are kept this long")
    concurrency: int = Field(64, ge=1, description="lines of all jobs in flight at once on this server")
    concurrency_busy: int = Field(0, ge=0, description="the same while interactive requests are in flight (0: "
                                  "paused, but one line a second, so that no job stops)")
    priority: int = Field(10, description="engine priority of job lines (interactive requests: 0; lower runs first)")


@dataclass
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class Job:
    """One batch job, as OpenAI's Batch object (``to_json``) plus ``tenant`` (who owns it: the hash of
    the API key that created it, "" without keys) and ``retain_until`` (when expiry deletes it)."""

    id: str
    endpoint: str
    input_file_id: str | None
    status: str = "in_progress"
    created_at: int = field(default_factory=now)
    completion_window: str = "24h"
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    expired_at: int | None = None
    expires_at: int | None = None
    retain_until: float | None = None
    tenant: str = ""

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> dict[str, Any]:
        """OpenAI's Batch object (``tenant`` and ``retain_until`` stay on the server)."""
        d = dataclasses.asdict(self)
        del d["tenant"], d["retain_until"]
        d["object"] = "batch"
        d["errors"] = {"object": "list", "data": self.errors} if self.errors else None
        return d

    def to_record(self) -> dict[str, Any]:
        """Everything, for a store."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> Job:
        d = dict(d)
        d["request_counts"] = RequestCounts(**d["request_counts"])
        return cls(**d)


@dataclass(frozen=True)
class FileObject:
    """OpenAI's File object."""

    id: str
    bytes: int
    filename: str
    purpose: str
    created_at: int = field(default_factory=now)
    tenant: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose}


@dataclass(frozen=True)
class JobLine:
    """Input line ``index`` of a job: ``url`` names how ``body`` is read (``ENDPOINTS`` or
    ``GRPC_LINE``). ``error`` set: the line could not be read and is failed without running."""

    index: int
    custom_id: str
    url: str
    body: dict[str, Any] | None
    error: dict[str, Any] | None = None

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> JobLine:
        return cls(**d)


@dataclass(frozen=True)
class LineResult:
    """The one result of a line. ``completion``: ``Completion.to_json()`` of a request that ran;
    otherwise ``error``: ``{"code", "message", "param", "status"}`` (a gRPC code name, the field to
    blame, the HTTP status an endpoint would have answered). ``seq``: its place in commit order."""

    index: int
    custom_id: str
    completion: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    seq: int = -1

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_record(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["seq"]
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any], seq: int = -1) -> LineResult:
        return cls(**{**d, "seq": seq})
