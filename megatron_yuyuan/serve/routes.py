"""The endpoints: ``POST /api/answer`` (the QA endpoint: the model's own prompt template),
``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI's schemas, with server-sent
event streaming, ``n`` choices and, for completions, ``logprobs``), ``GET /health`` and ``GET
/v1/models``. Each reads the app's :class:`Service`.

Decoding settings a request leaves out take the served model's defaults: those its run's
end-of-training evaluation used (repetition penalty, no-repeat n-gram size, and for /api/answer the
answer length), so a served answer looks like the evaluated ones."""

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
from megatron_yuyuan.serve.errors import APIError, GenerationFailed, failed
from megatron_yuyuan.serve.scheduler import SHUTTING_DOWN, Request, Scheduler
from megatron_yuyuan.serve.schemas import (
    MAX_CHOICES,
    MAX_SEED,
    AnswerRequest,
    ChatRequest,
    CompletionRequest,
    parse_body,
    sampling,
)
from megatron_yuyuan.serve.streaming import (
    TextStream,
    events_of,
    openai_logprobs,
    sse,
    token_usage,
)

router = APIRouter()


@dataclass
class Service:
    """What the endpoints serve: the scheduler, its tokenizer and the model's description."""

    scheduler: Scheduler
    tokenizer: object
    model: ServedModel  # noqa: F821 (megatron_yuyuan.serve.app; only its fields are read)

    @property
    def max_positions(self) -> int:
        return self.scheduler.engine.max_positions

    @property
    def default_budget(self) -> int:
        """New tokens when a request names no limit: the evaluation's, else 128 (at most half
        the positions)."""
        recorded = self.model.decoding.get("max_new_tokens")
        return min(recorded or 128, self.max_positions // 2)

    @property
    def defaults(self) -> dict:
        """The repetition controls a request leaves out."""
        d = self.model.decoding
        return {
            "repetition_penalty": float(d.get("repetition_penalty", 1.0)),
            "no_repeat_ngram_size": int(d.get("no_repeat_ngram_size", 0)),
        }

    def controls(self, body) -> dict:
        """The body's repetition controls, the defaults where it sent none."""
        return {
            k: v if getattr(body, k, None) is None else getattr(body, k)
            for k, v in self.defaults.items()
        }

    def check_budget(
        self, prompt: list[int], budget: int, field_name: str, prompt_field: str
    ) -> None:
        if budget > self.max_positions:
            raise APIError(
                422,
                f"{field_name}: {budget} is more than {self.max_positions} (the model's "
                f"positions); ask for at most {max(self.max_positions - len(prompt), 0)} tokens",
                field_name,
            )
        if not prompt:
            raise APIError(
                422, f"{prompt_field}: the prompt encodes to no tokens", prompt_field.split("[")[0]
            )
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
        self,
        jobs: list[tuple[list[int], SamplingConfig]],
        tokens: bool = True,
        logprobs: int | None = None,
    ) -> list[Request]:
        """Queue every prompt of one HTTP request, or none of them (503 when there is no room)."""
        if self.scheduler.room() < len(jobs):
            raise APIError(
                503,
                SHUTTING_DOWN
                if self.scheduler.draining
                else "the server is busy: too many requests waiting; retry shortly",
                headers={"Retry-After": "1"},
            )
        requests = [Request(prompt, cfg, tokens, logprobs) for prompt, cfg in jobs]
        for request in requests:
            self.scheduler.submit(request)
        return requests


def choice_seeds(seed: int, n: int) -> list[int]:
    """Choice j of a request is drawn with ``seed + j``: n samples differ, each reproducible."""
    return [(seed + j) % (MAX_SEED + 1) for j in range(n)]


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
    budget = body.max_new_tokens or svc.default_budget
    cfg = sampling(  # the values' bounds, as a 422 like the schema's
        body.temperature, body.top_p, body.top_k, body.seed, budget, **svc.controls(body)
    )
    try:
        row = {**(body.fields or {}), "question": body.question}
        prompt = prompt_ids(tokenizer, model.template, row)
    except UserError as exc:
        raise APIError(400, str(exc), "fields") from None
    svc.check_budget(prompt, budget, "max_new_tokens", "question")
    (request,) = svc.submit([(prompt, cfg)], tokens=body.stream)
    stream = TextStream(tokenizer, [])

    def result(ids: list[int]) -> dict:
        reason = finish_of(ids, budget, stream)
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
                async for delta, ids, _ in events_of(request, stream, http):
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
        async for _, ids, _ in events_of(request, stream, http):
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
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(
            422,
            f"n: {len(prompts)} prompts x n={body.n} is {len(prompts) * body.n} choices; at most "
            f"{MAX_CHOICES} per request",
            "n",
        )
    if body.echo and body.logprobs is not None:
        raise APIError(
            422, "logprobs: not supported with echo (the prompt's log-probabilities)", "logprobs"
        )
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    budget = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
    seed = body.seed if body.seed is not None else 1234
    controls = svc.controls(body)
    top_k = body.top_k or 0
    cfgs = [
        sampling(body.temperature, body.top_p, top_k, s, budget, **controls)
        for s in choice_seeds(seed, body.n)
    ]
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
        svc.check_budget(ids, budget, "max_tokens", where)
    jobs = [(ids, cfg) for ids in encoded for cfg in cfgs]  # choice index = prompt * n + j
    requests = svc.submit(jobs, tokens=body.stream or bool(stops), logprobs=body.logprobs)
    streams = [TextStream(tokenizer, stops) for _ in jobs]
    texts = [prompts[i // body.n] if body.echo else "" for i in range(len(jobs))]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(index: int, text: str, reason: str | None, entries=None, at: int = 0) -> dict:
        lp = None
        if body.logprobs is not None:
            lp = openai_logprobs(tokenizer, entries or [], at)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": [{"text": text, "index": index, "logprobs": lp, "finish_reason": reason}],
        }

    def reason_of(ids, stream):
        r = finish_of(ids, budget, stream)
        return "stop" if r == "eos" else r

    def cancel_all():  # one choice failed or the client left: the others stop too
        for r in requests:
            r.cancel()

    if body.stream:
        usage = [0]  # completion tokens, for stream_options.include_usage

        async def events():
            try:
                for i, (req, stream) in enumerate(zip(requests, streams)):
                    at = len(texts[i])
                    if body.echo:
                        yield sse(chunk(i, texts[i], None))
                    async for delta, ids, entries in events_of(req, stream, http):
                        if delta or entries:
                            yield sse(chunk(i, delta, None, entries, at))
                            at += sum(len(tokenizer.decode([t])) for t, _, _ in entries)
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
            text, collected = texts[i], []
            async for delta, ids, entries in events_of(req, stream, http):
                text += delta
                collected += entries
                if ids is not None:
                    completion_tokens += len(ids)
                    lp = None
                    if body.logprobs is not None:
                        lp = openai_logprobs(tokenizer, collected, len(texts[i]))
                    choices.append(
                        {
                            "text": text,
                            "index": i,
                            "logprobs": lp,
                            "finish_reason": reason_of(ids, stream),
                        }
                    )
    except GenerationFailed as exc:
        raise failed(exc) from None
    finally:
        cancel_all()
    if len(choices) < len(jobs):
        return JSONResponse({}, status_code=499)
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model.name,
        "choices": choices,
        "usage": token_usage(sum(map(len, encoded)) * body.n, completion_tokens),
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
    cfg = sampling(
        body.temperature, body.top_p, body.top_k or 0, seed, budget, **svc.controls(body)
    )
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
                async for delta, ids, _ in events_of(request, stream, http):
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
        async for delta, ids, _ in events_of(request, stream, http):
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
    scheduler = http.app.state.service.scheduler
    model = http.app.state.service.model
    alive = scheduler.alive()
    body = {
        "status": "ok" if alive else "error: the generation thread stopped",
        "model": model.name,
        "layout": model.layout,
        "scheduler": scheduler.policy,
        "queued": scheduler.waiting(),
        "running": scheduler.running(),
        "steps": scheduler.steps,
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
