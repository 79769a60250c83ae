"""The FastAPI app: OpenAI-compatible routes over a ServeEngine, one named handler each.

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
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error(status: int, message: str, kind: str = "invalid_request_error",
          code: str | None = None, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(P.error_body(message, kind, code, param), status_code=status, headers=headers)


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


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


class Api:
    """The routes' shared state (engine, accepted model names, API key) and handlers."""

    def __init__(self, engine: ServeEngine, api_key: str | None, aliases: tuple[str, ...]) -> None:
        self.engine, self.api_key = engine, api_key
        self.names = {engine.model_id, *aliases}

    # ---- middleware and errors ----------------------------------------------------------
    async def auth_and_count(self, request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        path = request.url.path
        if self.api_key and path != "/health":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
                response = error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 "authentication_error", "invalid_api_key")
                self.observe(path, 401, t0)
                return response
        response = await call_next(request)
        if path.startswith("/v1/") and response.status_code != 200 or path.endswith("models"):
            self.observe(path, response.status_code, t0)  # generations are counted when they end
        return response

    def observe(self, endpoint: str, status: int, t0: float) -> None:
        self.engine.metrics.observe_request(endpoint, status, time.perf_counter() - t0)

    # ---- requests to jobs -----------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.names:
            raise ApiError(404, f"the model '{model}' does not exist here; this server runs "
                                f"'{self.engine.model_id}' (GET /v1/models)", code="model_not_found",
                           param="model")

    def make_job(self, tokens: list[int], req: P._Common, endpoint: str) -> Job:
        engine = self.engine
        try:
            engine.check_fit(tokens, req.wanted_tokens())
        except ContextOverflowError as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="max_tokens") from None
        sampling = req.sampling()
        if sampling.seed is None:
            sampling.seed = engine.seed
        job = Job(tokens=tokens, max_tokens=req.wanted_tokens() or P.DEFAULT_MAX_TOKENS,
                  sampling=sampling, stop=req.stops(), endpoint=endpoint)
        try:
            job.sampling.validate()
            engine.admit()
            engine.submit(job)
        except QueueFullError as e:
            raise ApiError(429, str(e), "rate_limit_error", "queue_full") from None
        except EdgeError as e:
            raise ApiError(400, str(e)) from None
        return job

    async def guard(self, events: AsyncIterator[bytes], endpoint: str, t0: float) -> AsyncIterator[bytes]:
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
            self.observe(endpoint, status, t0)

    async def collect(self, request: Request, job: Job) -> str:
        """Run a job to the end; a client that hangs up meanwhile cancels it."""
        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)
            job.client_gone = True
            job.cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            return "".join([p async for p in self.engine.pieces(job)])
        finally:
            watcher.cancel()

    # ---- routes ---------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "ok", "model": e.model_id, "in_flight": e.in_flight, "max_queue": e.max_queue}

    async def models(self) -> dict[str, Any]:
        e = self.engine
        return {"object": "list", "data": [
            {"id": e.model_id, "object": "model", "created": e.created, "owned_by": "edge"}]}

    async def metrics(self) -> PlainTextResponse:
        e = self.engine
        fairness = await asyncio.to_thread(last_fairness, e.gen.info.fingerprint)
        text = e.metrics.render(in_flight=e.in_flight, max_queue=e.max_queue, model_id=e.model_id,
                                fairness=fairness)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Any:
        t0 = time.perf_counter()
        req = await parse(request, P.ChatRequest)
        self.check_model(req.model)
        try:
            tokens = self.engine.chat_tokens(req.message_dicts())
        except Exception as e:  # a template that rejects the message order, for one
            raise ApiError(400, f"the chat template rejected these messages: {e}") from None
        job = self.make_job(tokens, req, CHAT)
        rid, model = P.new_id("chatcmpl"), self.engine.model_id
        if not req.stream:
            text = await self.collect(request, job)
            self.observe(CHAT, 499 if job.client_gone else 200, t0)
            assert job.stats is not None
            return P.chat_response(rid, model, text, job.stats)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[bytes]:
            yield sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            async for piece in self.engine.pieces(job):
                yield sse(P.chat_chunk(rid, model, {"content": piece}))
            assert job.stats is not None
            yield sse(P.chat_chunk(rid, model, {}, P.finish_reason(job.stats.stop_reason)))
            if include_usage:
                yield sse(P.chat_chunk(rid, model, {}, usage_=P.usage(job.stats), choices=False))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(self.guard(events(), CHAT, t0), media_type="text/event-stream")

    async def completions(self, request: Request) -> Any:
        t0 = time.perf_counter()
        req = await parse(request, P.CompletionRequest)
        self.check_model(req.model)
        try:
            tokens = self.engine.text_tokens(req.prompt_text())
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None
        job = self.make_job(tokens, req, COMPLETIONS)
        rid, model = P.new_id("cmpl"), self.engine.model_id
        if not req.stream:
            text = await self.collect(request, job)
            self.observe(COMPLETIONS, 499 if job.client_gone else 200, t0)
            assert job.stats is not None
            return P.completion_response(rid, model, text, P.finish_reason(job.stats.stop_reason),
                                         P.usage(job.stats))

        async def events() -> AsyncIterator[bytes]:
            async for piece in self.engine.pieces(job):
                yield sse(P.completion_response(rid, model, piece, None, None))
            assert job.stats is not None
            yield sse(P.completion_response(rid, model, "", P.finish_reason(job.stats.stop_reason),
                                            P.usage(job.stats)))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(self.guard(events(), COMPLETIONS, t0), media_type="text/event-stream")


async def _api_error(_req: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return error(e.status, e.message, e.kind, e.code, e.param)


async def _server_error(_req: Request, e: Exception) -> JSONResponse:
    return error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


async def _http_error(_req: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    return error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)


def create_app(engine: ServeEngine, *, api_key: str | None = None,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    api = Api(engine, api_key, aliases)
    app = FastAPI(title="edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(api.auth_and_count)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    app.add_api_route(CHAT, api.chat, methods=["POST"], response_model=None)
    app.add_api_route(COMPLETIONS, api.completions, methods=["POST"], response_model=None)
    return app
