"""The HTTP API: ``POST /api/answer`` (the QA endpoint), ``POST /v1/completions`` (OpenAI's
schema, with server-sent-event streaming), ``GET /health``, ``GET /v1/models`` and ``GET /`` (the
web page).

Client mistakes never reach the model: malformed JSON is a 400, a missing/empty field, a wrong
type or an out-of-range value a 422 naming the field, a prompt plus token budget beyond the model's
positions a 422 stating the limit. Errors have OpenAI's shape:
``{"error": {"message", "type", "param"}}``.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator, Literal, Optional, Sequence, Union

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from megatron_yuyuan.errors import UserError
from megatron_yuyuan.files import is_valid_unicode
from megatron_yuyuan.generation import SamplingConfig, finish_reason, prompt_ids
from megatron_yuyuan.prompts import DEFAULT_TEMPLATE, PromptTemplate
from megatron_yuyuan.serve.batcher import SHUTTING_DOWN, Batcher, Request


@dataclass
class ServedModel:
    """What the server says about itself."""

    name: str
    """Model id in /v1/models and on the page."""
    source: str
    """The checkpoint or HF directory it was loaded from."""
    layout: str = "TP=1, PP=1"
    """Its parallel layout, for /health and the page."""
    template: PromptTemplate = DEFAULT_TEMPLATE
    """The prompt template it was trained with: /api/answer and /v1/chat/completions use it."""


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
MAX_PROMPT_CHARS = 100_000
MAX_BODY_BYTES = 2_000_000


# ------------------------------------------------------------------------------------ schemas
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class AnswerRequest(_Strict):
    question: str = Field(min_length=1, max_length=4000)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    """0: greedy (as ``generate`` without --do-sample); > 0: sampling at this temperature."""
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(1234, ge=0, le=MAX_SEED)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    stream: bool = False
    fields: Optional[dict[str, str]] = None
    """The prompt template's other fields (e.g. ``{"context": "..."}``)."""

    @field_validator("question")
    @classmethod
    def not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must contain a question, not only whitespace")
        return v


class _OpenAIRequest(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    user: Optional[str] = None
    # OpenAI fields that clients send with their neutral values: accepted at those values only
    stream_options: Optional[dict] = None
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
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    logit_bias: Optional[dict] = None
    suffix: Optional[str] = None

    @field_validator("logprobs", "suffix")
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
        if len(items) > 16:
            raise ValueError("at most 16 prompts per request")
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
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, v):
        if v:
            raise ValueError("not supported by this server; send false or leave it out")
        return v


def sampling(temperature: float, top_p: float, top_k: int, seed: int, budget: int, **extra):
    """Greedy at temperature 0: then the seed and the sampling knobs take neutral values, so
    greedy requests batch together whatever their seeds."""
    greedy = temperature == 0.0
    try:
        return SamplingConfig(
            max_new_tokens=budget,
            do_sample=not greedy,
            temperature=1.0 if greedy else temperature,
            top_k=0 if greedy else top_k,
            top_p=1.0 if greedy else top_p,
            seed=1234 if greedy else seed,
            **extra,
        )
    except UserError as exc:  # the one bound on sampling values: a client error, not a 500
        flag, _, rest = str(exc).removeprefix("--").partition(" ")
        param = flag.replace("-", "_")  # --repetition-penalty -> the JSON field's name
        raise APIError(422, f"{param} {rest}", param) from None


# ------------------------------------------------------------------------------------ errors
class GenerationFailed(Exception):
    """The engine failed on a batch (a server fault, not the client's)."""


class ShuttingDown(GenerationFailed):
    """A queued request that the server refused when it began to shut down (503)."""


def failed(exc: GenerationFailed) -> APIError:
    """The HTTP error of a request whose generation did not happen."""
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), headers={"Retry-After": "1"})
    return APIError(500, f"generation failed: {exc}")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, headers=None):
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: Optional[str] = None, headers=None):
    kind = {400: "invalid_request_error", 404: "not_found_error", 422: "invalid_request_error"}
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


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


def validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field_name = loc[0] if loc else "body"  # not "prompt.str": pydantic names union members
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown or unsupported field"
    if e.get("type") == "missing":
        msg = "required field is missing"
    return error_response(422, f"{field_name}: {msg}", field_name)


# ------------------------------------------------------------------------------------ streams
class TextStream:
    """Incremental detokenisation with stop strings: text deltas that never split a UTF-8
    character (byte-level BPE can), cut before the first stop string."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                text = text[:at]
        return text

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd") and not self.stopped:
            return ""  # an incomplete character: wait for the next token
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stops), default=0)
        safe = text[: max(len(text) - hold, len(self.sent))]  # a stop string may still start
        delta, self.sent = safe[len(self.sent) :], safe
        return delta

    def rest(self) -> str:
        text = self.text()
        delta = text[len(self.sent) :]
        self.sent = text
        return delta


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


# ------------------------------------------------------------------------------------ the app
def token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def origin_allowed(origin: str, host: str, allowed: Sequence[str]) -> bool:
    """The page's own origin (same host:port as the request), or one listed."""
    if "*" in allowed or origin in allowed:
        return True
    return origin.split("://", 1)[-1].rstrip("/") == host


def create_app(
    batcher: Batcher, tokenizer, model: ServedModel, allowed_origins: Sequence[str] = ()
) -> FastAPI:
    """The FastAPI application over a running batcher (its loop starts with the app).

    A request whose ``Origin`` is another site than the server's own (a page the user visits
    posting a cross-site ``text/plain`` form, which browsers send without asking) is refused
    with 403 unless ``allowed_origins`` lists it (``*``: any)."""
    max_positions = batcher.engine.max_positions

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="megatron_yuyuan QA server", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, lambda r, e: validation_error(e))

    @app.middleware("http")
    async def same_origin_only(request: HTTPRequest, call_next):
        origin = request.headers.get("origin")
        if origin and not origin_allowed(origin, request.headers.get("host", ""), allowed_origins):
            return error_response(
                403,
                f"requests from the web origin {origin} are refused (start the server with "
                f"--allowed-origins {origin} to allow it)",
                "origin",
            )
        return await call_next(request)

    app.add_exception_handler(
        APIError, lambda r, e: error_response(e.status, e.message, e.param, e.headers)
    )

    def check_budget(prompt: list[int], budget: int, field_name: str, prompt_field: str) -> None:
        if len(prompt) >= max_positions:
            raise APIError(
                422,
                f"{prompt_field}: the prompt has {len(prompt)} tokens but the model takes at most "
                f"{max_positions} positions, one of which the answer needs: shorten it",
                prompt_field.split("[")[0],
            )
        if len(prompt) + budget > max_positions:
            raise APIError(
                422,
                f"{field_name}: the prompt has {len(prompt)} tokens and {field_name} is {budget}; "
                f"together they must be at most {max_positions} (the model's positions): "
                f"ask for at most {max(max_positions - len(prompt), 0)} tokens or shorten the "
                f"prompt",
                field_name,
            )

    def submit(jobs: list[tuple[list[int], SamplingConfig]], tokens: bool = True) -> list[Request]:
        """Queue every prompt of one HTTP request, or none of them (503 when there is no room)."""
        if batcher.room() < len(jobs):
            raise APIError(
                503,
                SHUTTING_DOWN
                if batcher.draining
                else "the server is busy: too many requests waiting; retry shortly",
                headers={"Retry-After": "1"},
            )
        requests = [Request(prompt, cfg, tokens) for prompt, cfg in jobs]
        for request in requests:
            batcher.submit(request)
        return requests

    async def run(
        request: Request, stream: TextStream, http: HTTPRequest
    ) -> AsyncIterator[tuple[str, Optional[list[int]]]]:
        """(text delta, None) per token, then ("", ids) when done. A stop string, an error or a
        client that went away (checked twice a second, tokens arriving or not) cancels the
        request, so its row stops costing compute at the next step."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + 0.5
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(request.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    kind, value = None, None
                if loop.time() >= next_check:
                    next_check = loop.time() + 0.5
                    if await http.is_disconnected():
                        return
                if kind == "token":
                    if stream.stopped:
                        continue
                    delta = stream.push(value)
                    if stream.stopped:
                        request.cancel()
                    if delta:
                        yield delta, None
                elif kind == "done":
                    if not request.tokens:  # no token events came: the text is all new
                        stream.ids = list(value)
                    yield stream.rest(), value
                    return
                elif kind == "error":
                    raise GenerationFailed(value)
                elif kind == "unavailable":  # queued when the server began to shut down
                    raise ShuttingDown(value)
        finally:
            request.cancel()

    def finish(ids: list[int], budget: int, stream: TextStream) -> str:
        return "stop" if stream.stopped else finish_reason(len(ids), budget)

    def sse_error(exc: GenerationFailed) -> str:
        # headers are gone already: the error travels as an event (the page shows it)
        return sse({"error": {"message": f"generation failed: {exc}", "type": "server_error"}})

    @app.post("/api/answer")
    async def answer(http: HTTPRequest):
        body = await parse_body(http, AnswerRequest)
        try:
            row = {**(body.fields or {}), "question": body.question}
            prompt = prompt_ids(tokenizer, model.template, row)
        except UserError as exc:
            raise APIError(400, str(exc), "fields") from None
        check_budget(prompt, body.max_new_tokens, "max_new_tokens", "question")
        cfg = sampling(
            body.temperature,
            body.top_p,
            body.top_k,
            body.seed,
            body.max_new_tokens,
            repetition_penalty=body.repetition_penalty,
            no_repeat_ngram_size=body.no_repeat_ngram_size,
        )
        (request,) = submit([(prompt, cfg)], tokens=body.stream)
        stream = TextStream(tokenizer, [])

        def result(ids: list[int]) -> dict:
            reason = finish(ids, body.max_new_tokens, stream)
            # the same answer text as `generate`: the continuation up to EOS, stripped
            return {
                "answer": tokenizer.decode(ids).strip(),
                "tokens": len(ids),
                "finish_reason": reason,
            }

        if body.stream:

            async def events():
                started = False  # the answer is stripped: so is the start of its stream
                try:
                    async for delta, ids in run(request, stream, http):
                        if not started:
                            delta = delta.lstrip()
                            started = bool(delta)
                        if delta:
                            yield sse({"text": delta})
                        if ids is not None:
                            yield sse({"done": True, **result(ids)})
                except GenerationFailed as exc:
                    yield sse_error(exc)

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            async for _, ids in run(request, stream, http):
                if ids is not None:
                    return result(ids)
        except GenerationFailed as exc:
            raise failed(exc) from None
        return JSONResponse({}, status_code=499)  # the client closed the request

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await parse_body(http, CompletionRequest)
        if body.model not in (None, model.name):
            raise APIError(
                404, f"model: {body.model!r} is not served here; use {model.name!r}", "model"
            )
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        budget = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
        encoded = [tokenizer.encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            check_budget(ids, budget, "max_tokens", where)
        seed = body.seed if body.seed is not None else 1234
        cfg = sampling(body.temperature, body.top_p, 0, seed, budget)
        requests = submit([(ids, cfg) for ids in encoded], tokens=body.stream or bool(stops))
        streams = [TextStream(tokenizer, stops) for _ in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(index: int, text: str, reason: Optional[str]) -> dict:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model.name,
                "choices": [
                    {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
                ],
            }

        def reason_of(ids, stream):
            r = finish(ids, budget, stream)
            return "stop" if r == "eos" else r

        def cancel_all():  # one prompt failed or the client left: the others stop too
            for r in requests:
                r.cancel()

        if body.stream:
            usage = [0]  # completion tokens, for stream_options.include_usage

            async def events():
                try:
                    for i, (req, stream) in enumerate(zip(requests, streams)):
                        if body.echo:
                            yield sse(chunk(i, prompts[i], None))
                        async for delta, ids in run(req, stream, http):
                            if delta:
                                yield sse(chunk(i, delta, None))
                            if ids is not None:
                                yield sse(chunk(i, "", reason_of(ids, stream)))
                                usage[0] += len(ids)
                    if (body.stream_options or {}).get("include_usage"):
                        yield sse(
                            {
                                "id": rid,
                                "object": "text_completion",
                                "created": created,
                                "model": model.name,
                                "choices": [],
                                "usage": token_usage(sum(map(len, encoded)), usage[0]),
                            }
                        )
                    yield sse("[DONE]")
                except GenerationFailed as exc:
                    yield sse_error(exc)
                finally:
                    cancel_all()

            return StreamingResponse(events(), media_type="text/event-stream")
        choices, completion_tokens = [], 0
        try:
            for i, (req, stream) in enumerate(zip(requests, streams)):
                text = prompts[i] if body.echo else ""
                async for delta, ids in run(req, stream, http):
                    text += delta
                    if ids is not None:
                        completion_tokens += len(ids)
                        choices.append(
                            {
                                "text": text,
                                "index": i,
                                "logprobs": None,
                                "finish_reason": reason_of(ids, stream),
                            }
                        )
        except GenerationFailed as exc:
            raise failed(exc) from None
        finally:
            cancel_all()
        if len(choices) < len(prompts):
            return JSONResponse({}, status_code=499)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": choices,
            "usage": token_usage(sum(map(len, encoded)), completion_tokens),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await parse_body(http, ChatRequest)
        if body.model not in (None, model.name):
            raise APIError(
                404, f"model: {body.model!r} is not served here; use {model.name!r}", "model"
            )
        messages = [
            {**(m.model_extra or {}), "role": m.role, "content": m.content} for m in body.messages
        ]
        if messages[-1]["role"] != "user":
            raise APIError(400, "messages: the last message must be the user's", "messages")
        try:
            prompt = prompt_ids(tokenizer, model.template, {"messages": messages})
        except UserError as exc:
            raise APIError(400, f"messages: {exc}", "messages") from None
        budget = body.max_completion_tokens or body.max_tokens or min(128, max_positions // 2)
        check_budget(prompt, budget, "max_tokens", "messages")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        seed = body.seed if body.seed is not None else 1234
        cfg = sampling(body.temperature, body.top_p, 0, seed, budget)
        (request,) = submit([(prompt, cfg)], tokens=body.stream or bool(stops))
        stream = TextStream(tokenizer, stops)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def reason_of(ids):
            r = finish(ids, budget, stream)
            return "stop" if r == "eos" else r

        def chunk(delta: dict, reason: Optional[str]) -> dict:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }

        if body.stream:

            async def events():
                started = False  # answers are stripped: so is the start of the stream
                try:
                    yield sse(chunk({"role": "assistant", "content": ""}, None))
                    async for delta, ids in run(request, stream, http):
                        if not started:
                            delta = delta.lstrip()
                            started = bool(delta)
                        if delta:
                            yield sse(chunk({"content": delta}, None))
                        if ids is not None:
                            yield sse(chunk({}, reason_of(ids)))
                            if (body.stream_options or {}).get("include_usage"):
                                yield sse(
                                    {
                                        **chunk({}, None),
                                        "choices": [],
                                        "usage": token_usage(len(prompt), len(ids)),
                                    }
                                )
                    yield sse("[DONE]")
                except GenerationFailed as exc:
                    yield sse_error(exc)
                finally:
                    request.cancel()

            return StreamingResponse(events(), media_type="text/event-stream")
        text = ""
        try:
            async for delta, ids in run(request, stream, http):
                text += delta
                if ids is not None:
                    return {
                        "id": rid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model.name,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text.strip()},
                                "finish_reason": reason_of(ids),
                            }
                        ],
                        "usage": token_usage(len(prompt), len(ids)),
                    }
        except GenerationFailed as exc:
            raise failed(exc) from None
        return JSONResponse({}, status_code=499)  # the client closed the request

    @app.get("/health")
    async def health():
        alive = batcher.task is not None and not batcher.task.done()
        body = {
            "status": "ok" if alive else "error: the batch loop stopped",
            "model": model.name,
            "layout": model.layout,
            "queued": batcher.waiting(),
            "batches": batcher.batches,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": model.name, "object": "model", "created": 0, "owned_by": "megatron_yuyuan"}
            ],
        }

    page = (
        resources.files("megatron_yuyuan.serve")
        .joinpath("static/index.html")
        .read_text(encoding="utf-8")
        .replace("{{MODEL}}", html.escape(model.name))
        .replace("{{SOURCE}}", html.escape(model.source))
        .replace("{{LAYOUT}}", html.escape(model.layout))
        .replace("{{MAX_POSITIONS}}", str(max_positions))
        .replace("{{DEFAULT_TOKENS}}", str(min(128, max_positions // 2)))
    )

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app
