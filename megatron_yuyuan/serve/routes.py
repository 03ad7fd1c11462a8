"""The endpoints: ``POST /api/answer`` (the QA endpoint: the model's own prompt template),
``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI's schemas, with server-sent
event streaming), ``GET /health`` and ``GET /v1/models``. Each reads the app's :class:`Service`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from megatron_yuyuan.errors import UserError
from megatron_yuyuan.generation import finish_reason, prompt_ids
from megatron_yuyuan.sampling import SamplingConfig
from megatron_yuyuan.serve.batcher import SHUTTING_DOWN, Batcher, Request
from megatron_yuyuan.serve.errors import APIError, GenerationFailed, failed
from megatron_yuyuan.serve.schemas import (
    AnswerRequest,
    ChatRequest,
    CompletionRequest,
    parse_body,
    sampling,
)
from megatron_yuyuan.serve.streaming import TextStream, events_of, sse, token_usage

router = APIRouter()


@dataclass
class Service:
    """What the endpoints serve: the running batcher, its tokenizer and the model's description."""

    batcher: Batcher
    tokenizer: object
    model: ServedModel  # noqa: F821 (megatron_yuyuan.serve.app; only its fields are read)

    @property
    def max_positions(self) -> int:
        return self.batcher.engine.max_positions

    @property
    def default_budget(self) -> int:
        """New tokens when a chat request names no limit."""
        return min(128, self.max_positions // 2)

    def check_budget(
        self, prompt: list[int], budget: int, field_name: str, prompt_field: str
    ) -> None:
        if len(prompt) >= self.max_positions:
            raise APIError(
                422,
                f"{prompt_field}: the prompt has {len(prompt)} tokens but the model takes at most "
                f"{self.max_positions} positions, one of which the answer needs: shorten it",
                prompt_field.split("[")[0],
            )
        if len(prompt) + budget > self.max_positions:
            raise APIError(
                422,
                f"{field_name}: the prompt has {len(prompt)} tokens and {field_name} is {budget}; "
                f"together they must be at most {self.max_positions} (the model's positions): "
                f"ask for at most {max(self.max_positions - len(prompt), 0)} tokens or shorten the "
                f"prompt",
                field_name,
            )

    def submit(
        self, jobs: list[tuple[list[int], SamplingConfig]], tokens: bool = True
    ) -> list[Request]:
        """Queue every prompt of one HTTP request, or none of them (503 when there is no room)."""
        if self.batcher.room() < len(jobs):
            raise APIError(
                503,
                SHUTTING_DOWN
                if self.batcher.draining
                else "the server is busy: too many requests waiting; retry shortly",
                headers={"Retry-After": "1"},
            )
        requests = [Request(prompt, cfg, tokens) for prompt, cfg in jobs]
        for request in requests:
            self.batcher.submit(request)
        return requests


def finish_of(ids: list[int], budget: int, stream: TextStream) -> str:
    return "stop" if stream.stopped else finish_reason(len(ids), budget)


def sse_error(exc: GenerationFailed) -> str:
    # headers are gone already: the error travels as an event (the page shows it)
    return sse({"error": {"message": f"generation failed: {exc}", "type": "server_error"}})


async def openai_body(http: HTTPRequest, schema: type[BaseModel]):
    """The app's :class:`Service` and the request body as ``schema``, whose ``model`` (when sent)
    must be the one served (404 otherwise, as OpenAI answers)."""
    svc: Service = http.app.state.service
    body = await parse_body(http, schema)
    if body.model not in (None, svc.model.name):
        raise APIError(
            404, f"model: {body.model!r} is not served here; use {svc.model.name!r}", "model"
        )
    return svc, body


@router.post("/api/answer")
async def answer(http: HTTPRequest):
    svc: Service = http.app.state.service
    tokenizer, model = svc.tokenizer, svc.model
    body = await parse_body(http, AnswerRequest)
    cfg = sampling(  # the values' bounds, as a 422 like the schema's
        body.temperature,
        body.top_p,
        body.top_k,
        body.seed,
        body.max_new_tokens,
        repetition_penalty=body.repetition_penalty,
        no_repeat_ngram_size=body.no_repeat_ngram_size,
    )
    try:
        row = {**(body.fields or {}), "question": body.question}
        prompt = prompt_ids(tokenizer, model.template, row)
    except UserError as exc:
        raise APIError(400, str(exc), "fields") from None
    svc.check_budget(prompt, body.max_new_tokens, "max_new_tokens", "question")
    (request,) = svc.submit([(prompt, cfg)], tokens=body.stream)
    stream = TextStream(tokenizer, [])

    def result(ids: list[int]) -> dict:
        reason = finish_of(ids, body.max_new_tokens, stream)
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
                async for delta, ids in events_of(request, stream, http):
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
        async for _, ids in events_of(request, stream, http):
            if ids is not None:
                return result(ids)
    except GenerationFailed as exc:
        raise failed(exc) from None
    return JSONResponse({}, status_code=499)  # the client closed the request


@router.post("/v1/completions")
async def completions(http: HTTPRequest):
    svc, body = await openai_body(http, CompletionRequest)
    tokenizer, model = svc.tokenizer, svc.model
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    budget = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
    seed = body.seed if body.seed is not None else 1234
    cfg = sampling(body.temperature, body.top_p, 0, seed, budget)
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
        svc.check_budget(ids, budget, "max_tokens", where)
    requests = svc.submit([(ids, cfg) for ids in encoded], tokens=body.stream or bool(stops))
    streams = [TextStream(tokenizer, stops) for _ in prompts]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(index: int, text: str, reason: str | None) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}],
        }

    def reason_of(ids, stream):
        r = finish_of(ids, budget, stream)
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
                    async for delta, ids in events_of(req, stream, http):
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
            async for delta, ids in events_of(req, stream, http):
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


@router.post("/v1/chat/completions")
async def chat_completions(http: HTTPRequest):
    svc, body = await openai_body(http, ChatRequest)
    tokenizer, model = svc.tokenizer, svc.model
    messages = [
        {**(m.model_extra or {}), "role": m.role, "content": m.content} for m in body.messages
    ]
    budget = body.max_completion_tokens or body.max_tokens or svc.default_budget
    seed = body.seed if body.seed is not None else 1234
    cfg = sampling(body.temperature, body.top_p, 0, seed, budget)
    if messages[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must be the user's", "messages")
    try:
        prompt = prompt_ids(tokenizer, model.template, {"messages": messages})
    except UserError as exc:
        raise APIError(400, f"messages: {exc}", "messages") from None
    svc.check_budget(prompt, budget, "max_tokens", "messages")
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    (request,) = svc.submit([(prompt, cfg)], tokens=body.stream or bool(stops))
    stream = TextStream(tokenizer, stops)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def reason_of(ids):
        r = finish_of(ids, budget, stream)
        return "stop" if r == "eos" else r

    def chunk(delta: dict, reason: str | None) -> dict:
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
                async for delta, ids in events_of(request, stream, http):
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
        async for delta, ids in events_of(request, stream, http):
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


@router.get("/health")
async def health(http: HTTPRequest):
    batcher = http.app.state.service.batcher
    model = http.app.state.service.model
    alive = batcher.task is not None and not batcher.task.done()
    body = {
        "status": "ok" if alive else "error: the batch loop stopped",
        "model": model.name,
        "layout": model.layout,
        "queued": batcher.waiting(),
        "batches": batcher.batches,
    }
    return JSONResponse(body, status_code=200 if alive else 503)


@router.get("/v1/models")
async def models(http: HTTPRequest):
    model = http.app.state.service.model
    return {
        "object": "list",
        "data": [
            {"id": model.name, "object": "model", "created": 0, "owned_by": "megatron_yuyuan"}
        ],
    }
