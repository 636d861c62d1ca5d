"""The OpenAI Batch API on a ``JobService``:

    POST /v1/files                  multipart: file, purpose "batch" (413 past the file limit)
    GET  /v1/files                  this caller's files, newest first (?purpose=)
    GET  /v1/files/{id}             the File object
    GET  /v1/files/{id}/content     the bytes (inputs, and the output and error files of ended jobs)
    DELETE /v1/files/{id}
    POST /v1/batches                {input_file_id, endpoint, completion_window "24h", metadata}
    GET  /v1/batches                newest first (?after=&limit=)
    GET  /v1/batches/{id}
    POST /v1/batches/{id}/cancel

so the ``openai`` client's ``files.create`` / ``batches.create`` / ``batches.retrieve`` /
``files.content`` workflow runs unchanged. Errors are OpenAI error objects, as on the other endpoints.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from router.http.errors import APIError
from router.jobs.service import JobError, JobService, tenant_of


class CreateBatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(..., description="an uploaded file of purpose 'batch'")
    endpoint: str = Field(..., description="/v1/completions or /v1/chat/completions")
    completion_window: str = Field("24h", description="only 24h")
    metadata: dict[str, str] | None = Field(None, description="up to 16 pairs")


def add_batch_routes(app: FastAPI, jobs: JobService, v1: dict[str, Any]) -> None:
    """Add the routes to ``app``; ``v1`` holds the API-key dependency (it sets request.state.tenant)."""

    def who(request: Request) -> str:
        return tenant_of(request.state.tenant)

    @app.post("/v1/files", **v1)
    async def upload_file(request: Request, file: UploadFile, purpose: str = Form(...)) -> dict[str, Any]:
        limit = jobs.limits.max_file_bytes
        data = await file.read(limit + 1)
        with _errors():
            f = await jobs.upload(data, filename=file.filename or "", purpose=purpose, tenant=who(request))
        return f.to_json()

    @app.get("/v1/files", **v1)
    async def list_files(request: Request, purpose: str | None = None) -> dict[str, Any]:
        files = await jobs.list_files(who(request), purpose)
        return {"object": "list", "data": [f.to_json() for f in files], "has_more": False}

    @app.get("/v1/files/{file_id}", **v1)
    async def get_file(file_id: str, request: Request) -> dict[str, Any]:
        with _errors():
            return (await jobs.file(file_id, who(request))).to_json()

    @app.get("/v1/files/{file_id}/content", **v1)
    async def file_content(file_id: str, request: Request) -> Response:
        with _errors():
            data = await jobs.file_content(file_id, who(request))
        return Response(data, media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}", **v1)
    async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
        with _errors():
            await jobs.delete_file(file_id, who(request))
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches", **v1)
    async def create_batch(body: CreateBatchBody, request: Request) -> dict[str, Any]:
        with _errors():
            job = await jobs.create(endpoint=body.endpoint, input_file_id=body.input_file_id, tenant=who(request),
                                    metadata=body.metadata, completion_window=body.completion_window)
        return job.to_json()

    @app.get("/v1/batches", **v1)
    async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        with _errors():
            found = await jobs.list(who(request), after=after, limit=limit)
            more = bool(found) and bool(await jobs.list(who(request), after=found[-1].id, limit=1))
        return {"object": "list", "data": [j.to_json() for j in found], "has_more": more,
                "first_id": found[0].id if found else None, "last_id": found[-1].id if found else None}

    @app.get("/v1/batches/{batch_id}", **v1)
    async def get_batch(batch_id: str, request: Request) -> dict[str, Any]:
        with _errors():
            return (await jobs.get(batch_id, who(request))).to_json()

    @app.post("/v1/batches/{batch_id}/cancel", **v1)
    async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
        with _errors():
            return (await jobs.cancel(batch_id, who(request))).to_json()


class _errors:
    """JobError as an OpenAI error object with its status."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, JobError):
            message = f"{exc.field}: {exc.message}" if exc.field else exc.message
            kind_name = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
            raise APIError(exc.status, message, param=exc.field, code=exc.code, type=kind_name) from None
        return False
