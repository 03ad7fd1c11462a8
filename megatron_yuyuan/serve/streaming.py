"""A request's tokens as text: incremental detokenisation with stop strings, server-sent events,
and the per-request event loop that notices a client that went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import Request as HTTPRequest

from megatron_yuyuan.serve.batcher import Request
from megatron_yuyuan.serve.errors import GenerationFailed, ShuttingDown


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


def token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def events_of(
    request: Request, stream: TextStream, http: HTTPRequest
) -> AsyncIterator[tuple[str, list[int] | None]]:
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
