"""``dsaserve.v1.BatchJobs``: the gRPC face of ``JobService``."""

from __future__ import annotations

import grpc

from router import wire
from router.jobs.lines import GRPC_CODES, completion_from_json
from router.jobs.service import JobError, JobService, tenant_of
from router.jobs.types import Job, LineResult
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from router.proto.dsaserve.v1 import dsaserve_pb2_grpc as pb_grpc

DEFAULT_LIST_LIMIT = 20


def job_to_proto(job: Job) -> pb.Job:
    return pb.Job(
        id=job.id, status=job.status, total=job.request_counts.total, completed=job.request_counts.completed,
        failed=job.request_counts.failed, endpoint=job.endpoint, input_file_id=job.input_file_id or "",
        output_file_id=job.output_file_id or "", error_file_id=job.error_file_id or "", created_at=job.created_at,
        ended_at=job.completed_at or job.cancelled_at or job.failed_at or 0, metadata=job.metadata or {},
    )


def result_to_proto(r: LineResult) -> pb.JobResult:
    if r.error is not None:
        info = wire.ErrorInfo(_grpc_code(r.error), r.error["message"], r.error.get("param"))
        response = wire.error_to_proto(r.custom_id, info)
    else:
        response = wire.completion_to_proto(completion_from_json({**r.completion, "request_id": r.custom_id}))
    return pb.JobResult(offset=r.seq, index=r.index, custom_id=r.custom_id, response=response)


def _grpc_code(error: dict) -> str:
    """A stored error's gRPC code: its own code when it is one, else the one of its HTTP status."""
    code = error.get("code") or ""
    return code if code.isupper() else GRPC_CODES.get(error.get("status", 500), "INTERNAL")


class BatchJobsServicer(pb_grpc.BatchJobsServicer):
    """``authorize(context)`` -> the caller's API key ("" without keys); it aborts the call itself
    (UNAUTHENTICATED) when the key is wrong."""

    def __init__(self, service: JobService, authorize) -> None:
        self.service = service
        self.authorize = authorize

    async def _tenant(self, context) -> str:
        return tenant_of(await self.authorize(context))

    async def CreateJob(self, request: pb.CreateJobRequest, context) -> pb.Job:
        tenant = await self._tenant(context)
        try:
            if request.input_file_id:
                if request.requests:
                    raise JobError(400, "requests", "give either requests or input_file_id, not both")
                job = await self.service.create(endpoint=request.endpoint, input_file_id=request.input_file_id,
                                                metadata=dict(request.metadata) or None, tenant=tenant)
            else:
                job = await self.service.create(endpoint="dsaserve.v1.GenerateRequest", requests=list(request.requests),
                                                metadata=dict(request.metadata) or None, tenant=tenant)
        except JobError as e:
            await _abort(context, e)
        return job_to_proto(job)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        tenant = await self._tenant(context)
        try:
            return job_to_proto(await self.service.get(request.job_id, tenant))
        except JobError as e:
            await _abort(context, e)

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        tenant = await self._tenant(context)
        limit = request.limit or DEFAULT_LIST_LIMIT
        try:
            jobs = await self.service.list(tenant, after=request.after or None, limit=limit)
            more = bool(jobs) and bool(await self.service.list(tenant, after=jobs[-1].id, limit=1))
        except JobError as e:
            await _abort(context, e)
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], has_more=more)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        tenant = await self._tenant(context)
        try:
            return job_to_proto(await self.service.cancel(request.job_id, tenant))
        except JobError as e:
            await _abort(context, e)

    async def StreamResults(self, request: pb.StreamResultsRequest, context) -> None:
        tenant = await self._tenant(context)
        try:
            async for r in self.service.follow(request.job_id, tenant, request.offset):
                await context.write(result_to_proto(r))
        except JobError as e:
            await _abort(context, e)


async def _abort(context, e: JobError) -> None:
    metadata = ((wire.FIELD_KEY, e.field),) if e.field else ()
    message = f"{e.field}: {e.message}" if e.field else e.message
    await context.abort(getattr(grpc.StatusCode, GRPC_CODES.get(e.status, "INTERNAL")), message,
                        trailing_metadata=metadata)
