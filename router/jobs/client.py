"""The blocking client of ``dsaserve.v1.BatchJobs``: ``Client(address).jobs``.

    with Client("127.0.0.1:50051") as c:
        job = c.jobs.create([{"id": "a", "prompt": "Hi", "max_tokens": 4}, ...])
        for r in c.jobs.results(job.id):          # resumable: results(job.id, offset=r.offset + 1)
            print(r.custom_id, r.completion or r.error)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from router import wire
from router.frontend import Completion, CompletionRequest
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from router.proto.dsaserve.v1 import dsaserve_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class JobInfo:
    id: str
    status: str
    total: int
    completed: int
    failed: int
    endpoint: str
    output_file_id: str
    error_file_id: str
    created_at: int
    ended_at: int
    metadata: dict[str, str]

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "expired", "cancelled")

    @classmethod
    def from_proto(cls, m: pb.Job) -> JobInfo:
        return cls(m.id, m.status, m.total, m.completed, m.failed, m.endpoint, m.output_file_id, m.error_file_id,
                   m.created_at, m.ended_at, dict(m.metadata))


@dataclass(frozen=True)
class JobResult:
    """One committed result: ``offset`` is its place in commit order (resume after it), ``index`` the
    request's place in the job's input."""

    offset: int
    index: int
    custom_id: str
    completion: Completion | None
    error: Any = None  # a DsaServeError


class JobsClient:
    def __init__(self, channel: grpc.Channel, metadata: Any, timeout: float | None, error_type: Any,
                 from_json: Callable[[Mapping[str, Any]], CompletionRequest]) -> None:
        self._stub = pb_grpc.BatchJobsStub(channel)
        self._metadata = metadata
        self._timeout = timeout
        # router.client's DsaServeError and request reader, passed in: that module imports this one.
        self._error = error_type
        self._from_json = from_json

    def create(self, requests: Iterable[CompletionRequest | Mapping[str, Any]],
               metadata: Mapping[str, str] | None = None) -> JobInfo:
        """A job of these requests (dicts as ``CompletionRequest.from_json`` reads them; ``id`` is the
        custom id). Raises DsaServeError."""
        msgs = [wire.request_to_proto(r if isinstance(r, CompletionRequest) else self._from_json(r))
                for r in requests]
        return self._call(self._stub.CreateJob, pb.CreateJobRequest(requests=msgs, metadata=dict(metadata or {})))

    def create_from_file(self, input_file_id: str, endpoint: str) -> JobInfo:
        return self._call(self._stub.CreateJob, pb.CreateJobRequest(input_file_id=input_file_id, endpoint=endpoint))

    def get(self, job_id: str) -> JobInfo:
        return self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def list(self, *, after: str = "", limit: int = 20) -> tuple[list[JobInfo], bool]:
        """(jobs newest first, whether there are more)."""
        try:
            resp = self._stub.ListJobs(pb.ListJobsRequest(after=after, limit=limit), timeout=self._timeout,
                                       metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error.from_rpc_error(e) from None
        return [JobInfo.from_proto(j) for j in resp.jobs], resp.has_more

    def cancel(self, job_id: str) -> JobInfo:
        return self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id))

    def results(self, job_id: str, offset: int = 0, *, timeout: float | None = None) -> Iterator[JobResult]:
        """Results from ``offset`` on, as they are committed, until the job has ended."""
        call = self._stub.StreamResults(pb.StreamResultsRequest(job_id=job_id, offset=offset),
                                        timeout=timeout, metadata=self._metadata)
        try:
            for m in call:
                info = wire.error_from_proto(m.response)
                if info is not None:
                    yield JobResult(m.offset, m.index, m.custom_id, None, self._error.from_info(info))
                else:
                    completion = Completion.from_deltas([wire.delta_from_proto(m.response)])
                    yield JobResult(m.offset, m.index, m.custom_id, completion)
        except grpc.RpcError as e:
            raise self._error.from_rpc_error(e) from None
        finally:
            call.cancel()

    def _call(self, method: Any, msg: Any) -> JobInfo:
        try:
            return JobInfo.from_proto(method(msg, timeout=self._timeout, metadata=self._metadata))
        except grpc.RpcError as e:
            raise self._error.from_rpc_error(e) from None

