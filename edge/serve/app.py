"""The FastAPI app: OpenAI-compatible routes over a ServeEngine.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the
official clients raise their usual exceptions (BadRequestError, NotFoundError, ...).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge.errors import ContextOverflowError, EdgeError
from edge.serve import protocol as P
from edge.serve.engine import Job, QueueFullError, ServeEngine
from edge.serve.metrics import last_fairness

T = TypeVar("T", bound=BaseModel)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def create_app(engine: ServeEngine, *, api_key: str | None = None,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI(title="edge", docs_url=None, redoc_url=None, openapi_url=None)
    names = {engine.model_id, *aliases}

    def error(status: int, message: str, kind: str = "invalid_request_error",
              code: str | None = None, param: str | None = None) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 429 else None
        return JSONResponse(P.error_body(message, kind, code, param), status_code=status,
                            headers=headers)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        path = request.url.path
        if api_key and path != "/health":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                response = error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 "authentication_error", "invalid_api_key")
                engine.metrics.observe_request(path, 401, time.perf_counter() - t0)
                return response
        response = await call_next(request)
        if path.startswith("/v1/") and response.status_code != 200 or path.endswith("models"):
            # Successful generations are counted when their stream ends (see _observe).
            engine.metrics.observe_request(path, response.status_code, time.perf_counter() - t0)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError) -> JSONResponse:
        return error(e.status, e.message, e.kind, e.code, e.param)

    @app.exception_handler(Exception)
    async def _server_error(_req: Request, e: Exception) -> JSONResponse:
        return error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    async def parse(request: Request, model: type[T]) -> T:
        """The JSON body as `model`, whatever Content-Type says (curl -d sends a form's)."""
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        try:
            return model.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            msg = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
            raise ApiError(400, msg, param=where or None) from None

    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise ApiError(404, f"the model '{model}' does not exist here; this server runs "
                                f"'{engine.model_id}' (GET /v1/models)", code="model_not_found",
                           param="model")

    def make_job(tokens: list[int], req: P._Common, endpoint: str) -> Job:
        try:
            engine.check_fit(tokens, req.wanted_tokens())
        except ContextOverflowError as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="max_tokens") from None
        max_tokens = req.wanted_tokens() or P.DEFAULT_MAX_TOKENS
        job = Job(tokens=tokens, max_tokens=max_tokens, sampling=req.sampling(),
                  stop=req.stops(), endpoint=endpoint)
        try:
            job.sampling.validate()
            engine.admit()
            engine.submit(job)
        except QueueFullError as e:
            raise ApiError(429, str(e), "rate_limit_error", "queue_full") from None
        except EdgeError as e:
            raise ApiError(400, str(e)) from None
        return job

    def _observe(endpoint: str, status: int, t0: float) -> None:
        engine.metrics.observe_request(endpoint, status, time.perf_counter() - t0)

    async def guard(events: AsyncIterator[bytes], endpoint: str, t0: float) -> AsyncIterator[bytes]:
        """Count the stream when it ends (499: the client left first). Once a stream has
        started, an error can only be reported inside it."""
        status = 499
        try:
            async for chunk in events:
                yield chunk
            status = 200
        except Exception as e:
            status = 500
            yield sse(P.error_body(str(e) if isinstance(e, EdgeError) else
                                   f"generation failed: {type(e).__name__}: {e}", "server_error"))
        finally:
            _observe(endpoint, status, t0)

    async def collect(request: Request, job: Job) -> str:
        """Run a job to the end; a client that hangs up meanwhile cancels it."""
        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)
            job.client_gone = True
            job.cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            return "".join([p async for p in engine.pieces(job)])
        finally:
            watcher.cancel()

    def sse(obj: Any) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "in_flight": engine.in_flight,
                "max_queue": engine.max_queue}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "edge"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        fairness = await asyncio.to_thread(last_fairness, engine.rt.info.fingerprint)
        text = engine.metrics.render(in_flight=engine.in_flight, max_queue=engine.max_queue,
                                     model_id=engine.model_id, fairness=fairness)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        t0 = time.perf_counter()
        req = await parse(request, P.ChatRequest)
        check_model(req.model)
        try:
            tokens = engine.chat_tokens(req.message_dicts())
        except Exception as e:  # a template that rejects the message order, for one
            raise ApiError(400, f"the chat template rejected these messages: {e}") from None
        job = make_job(tokens, req, "/v1/chat/completions")
        rid = P.new_id("chatcmpl")
        model = engine.model_id
        if not req.stream:
            text = await collect(request, job)
            _observe("/v1/chat/completions", 499 if job.client_gone else 200, t0)
            assert job.stats is not None
            return P.chat_response(rid, model, text, job.stats)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[bytes]:
            yield sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            async for piece in engine.pieces(job):
                yield sse(P.chat_chunk(rid, model, {"content": piece}))
            assert job.stats is not None
            yield sse(P.chat_chunk(rid, model, {}, P.finish_reason(job.stats.stop_reason)))
            if include_usage:
                yield sse(P.chat_chunk(rid, model, {}, usage_=P.usage(job.stats), choices=False))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(guard(events(), "/v1/chat/completions", t0),
                                 media_type="text/event-stream")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        t0 = time.perf_counter()
        req = await parse(request, P.CompletionRequest)
        check_model(req.model)
        try:
            tokens = engine.text_tokens(req.prompt_text())
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None
        job = make_job(tokens, req, "/v1/completions")
        rid = P.new_id("cmpl")
        model = engine.model_id
        if not req.stream:
            text = await collect(request, job)
            _observe("/v1/completions", 499 if job.client_gone else 200, t0)
            assert job.stats is not None
            return P.completion_response(rid, model, text, P.finish_reason(job.stats.stop_reason),
                                         P.usage(job.stats))

        async def events() -> AsyncIterator[bytes]:
            async for piece in engine.pieces(job):
                yield sse(P.completion_response(rid, model, piece, None, None))
            assert job.stats is not None
            yield sse(P.completion_response(rid, model, "", P.finish_reason(job.stats.stop_reason),
                                            P.usage(job.stats)))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(guard(events(), "/v1/completions", t0),
                                 media_type="text/event-stream")

    return app


