"""OpenAI request bodies (pydantic) and response objects (plain dicts)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge.sampling import Sampling

# edge's own sampling defaults, so `edge serve` at a temperature equals `edge run` at it.
_DEFAULT = Sampling()
DEFAULT_MAX_TOKENS = 256


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown OpenAI fields (logit_bias, user, ...) are accepted and ignored, as llama-server does.
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=_DEFAULT.temp, ge=0, le=10)
    top_p: float = Field(default=_DEFAULT.top_p, gt=0, le=1)
    top_k: int = Field(default=_DEFAULT.top_k, ge=0)
    min_p: float = Field(default=_DEFAULT.min_p, ge=0, le=1)
    repeat_penalty: float = Field(default=_DEFAULT.repeat_penalty, gt=0, le=10)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 2)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    def sampling(self) -> Sampling:
        return Sampling(temp=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        min_p=self.min_p, repeat_penalty=self.repeat_penalty, seed=self.seed)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)

    def message_dicts(self) -> list[dict[str, str]]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("give one prompt per request (a string or a list of one)")
            return self.prompt[0]
        return self.prompt


def finish_reason(stop_reason: str) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}.get(stop_reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats: Any) -> dict[str, int]:
    return {"prompt_tokens": stats.n_prompt_tokens, "completion_tokens": stats.n_gen_tokens,
            "total_tokens": stats.n_prompt_tokens + stats.n_gen_tokens}


def chat_response(rid: str, model: str, text: str, stats: Any) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason(stats.stop_reason)}],
        "usage": usage(stats),
    }


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None,
               usage_: dict[str, int] | None = None, choices: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model, "choices": []}
    if choices:
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    if usage_ is not None:
        out["usage"] = usage_
    return out


def completion_response(rid: str, model: str, text: str, finish: str | None,
                        usage_: dict[str, int] | None, obj: str = "text_completion") -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid, "object": obj, "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if usage_ is not None:
        out["usage"] = usage_
    return out


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
