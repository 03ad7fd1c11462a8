"""What a request body must be: the JSON schemas of the endpoints, read from a body of bounded
size whatever its Content-Type.

Sampling values (temperature, top_p, ...) are typed here but bounded in one place,
:class:`megatron_yuyuan.sampling.SamplingConfig`, which :func:`sampling` builds.
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from megatron_yuyuan.files import is_valid_unicode
from megatron_yuyuan.sampling import SamplingConfig, SamplingLimitError
from megatron_yuyuan.serve.errors import APIError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
MAX_PROMPT_CHARS = 100_000
MAX_BODY_BYTES = 2_000_000
MAX_PROMPTS = 16
"""Prompts in one /v1/completions request."""
MAX_CHOICES = 64
"""Prompts x n in one /v1/completions request."""
MAX_LOGPROBS = 20
"""Alternatives per token in ``logprobs``."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class AnswerRequest(_Strict):
    question: str = Field(min_length=1, max_length=4000)
    max_new_tokens: int | None = Field(None, ge=1)
    """None: the served model's default (its evaluation's answer length)."""
    temperature: float = 0.0
    """0: greedy (as ``generate`` without --do-sample); > 0: sampling at this temperature."""
    top_k: int = 0
    top_p: float = 1.0
    seed: int = Field(1234, ge=0, le=MAX_SEED)
    repetition_penalty: float | None = None
    """None: the served model's default (its evaluation's)."""
    no_repeat_ngram_size: int | None = None
    stream: bool = False
    fields: dict[str, str] | None = None
    """The prompt template's other fields (e.g. ``{"context": "..."}``)."""

    @field_validator("question")
    @classmethod
    def not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must contain a question, not only whitespace")
        return v


class _OpenAIRequest(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=1)
    # extensions (as vLLM's): None takes the served model's defaults
    top_k: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = None
    # OpenAI fields that clients send with their neutral values: accepted at those values only
    stream_options: dict | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def zero_only(cls, v: float) -> float:
        if v != 0:
            raise ValueError("not supported by this server; send 0 or leave it out")
        return v

    @field_validator("stop")
    @classmethod
    def stops(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        return v


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Choices per prompt; choice j is drawn with ``seed + j``."""
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Each token's log-probability and this many most likely alternatives."""
    best_of: int | None = None
    logit_bias: dict | None = None
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def null_only(cls, v):
        if v is not None:
            raise ValueError("not supported by this server; send null or leave it out")
        return v

    @field_validator("best_of")
    @classmethod
    def one_only(cls, v):
        if v not in (None, 1):
            raise ValueError("only 1 is supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def empty_only(cls, v):
        if v:
            raise ValueError("not supported by this server; send {} or leave it out")
        return v

    @field_validator("prompt")
    @classmethod
    def prompts_non_empty(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items or any(not p for p in items):
            raise ValueError("must be a non-empty string or a non-empty list of them")
        if len(items) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        if any(len(p) > MAX_PROMPT_CHARS for p in items):
            raise ValueError(f"at most {MAX_PROMPT_CHARS} characters per prompt")
        return v


class ChatMessage(BaseModel):
    """An OpenAI chat message; a user message may carry the prompt template's other fields."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)

    @model_validator(mode="after")
    def extra_strings(self):
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
                raise ValueError(f"{name}: template fields must be strings")
        return self


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, v):
        if v:
            raise ValueError("not supported by this server; send false or leave it out")
        return v


def sampling(temperature: float, top_p: float, top_k: int, seed: int, budget: int, **extra):
    """A request's sampling values as a :class:`SamplingConfig`, which bounds them (a value out of
    range is a 422 naming its field). Greedy at temperature 0: then the seed and the sampling
    knobs take neutral values (a greedy answer is the same whatever seed it was sent with)."""
    greedy = temperature == 0.0
    asked = dict(temperature=1.0 if greedy else temperature, top_k=top_k, top_p=top_p, seed=seed)
    try:
        SamplingConfig(max_new_tokens=budget, do_sample=True, **asked, **extra)  # every value sent
    except SamplingLimitError as exc:  # a client error, not a 500
        raise APIError(422, f"{exc.field} {exc.problem}", exc.field) from None
    if greedy:
        return SamplingConfig(max_new_tokens=budget, **extra)
    return SamplingConfig(max_new_tokens=budget, do_sample=True, **asked, **extra)


async def read_limited(http: HTTPRequest) -> bytes:
    """The body, refused (413) by its Content-Length before it is read, and read no further than
    the limit when it comes chunked: a 1 GiB body never reaches memory."""
    declared = http.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise APIError(413, f"the body has {declared} bytes; at most {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the body has more than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(http: HTTPRequest, schema: type[BaseModel]):
    """The request body as ``schema``, whatever its Content-Type (curl's ``-d`` sends
    form-encoded): 400 for malformed JSON, 422 for a body the schema refuses."""
    raw = await read_limited(http)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise APIError(400, f"malformed JSON body ({exc}); send one JSON object") from None
    if not isinstance(data, dict):
        raise APIError(422, "body: must be a JSON object ({...})", "body")
    if not is_valid_unicode(data):
        raise APIError(
            400, "the body holds an unpaired surrogate escape (\\udXXX), which is not text", "body"
        )
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
