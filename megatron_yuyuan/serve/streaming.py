"""A request's tokens as text: incremental detokenisation with stop strings, server-sent events,
and the per-request event loop that notices a client that went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import Request as HTTPRequest

from megatron_yuyuan.serve.errors import GenerationFailed, ShuttingDown
from megatron_yuyuan.serve.scheduler import Request


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


def openai_logprobs(tokenizer, entries: list, offset: int = 0) -> dict:
    """OpenAI's completions ``logprobs`` object for ``entries`` of ``(token, logprob, [(id,
    logprob), ...])``; ``offset`` is where the first token's text starts in the choice's text."""
    tokens = [tokenizer.decode([t]) for t, _, _ in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [{tokenizer.decode([i]): v for i, v in top} for _, _, top in entries],
        "text_offset": offsets,
    }


async def events_of(
    request: Request, stream: TextStream, http: HTTPRequest
) -> AsyncIterator[tuple[str, list[int] | None, list]]:
    """(text delta, None, new logprob entries) per token, then ("", ids, entries) when done. A
    stop string, an error or a client that went away (checked twice a second, tokens arriving or
    not) cancels the request, so its row stops costing compute at the next step."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + 0.5
    entries: list = []  # logprob entries not yet yielded
    given = 0  # entries yielded so far
    try:
        while True:
            try:
                event = await asyncio.wait_for(request.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                event = (None,)
            if loop.time() >= next_check:
                next_check = loop.time() + 0.5
                if await http.is_disconnected():
                    return
            kind = event[0]
            if kind == "token":
                if stream.stopped:
                    continue
                _, token, logprob = event
                delta = stream.push(token)
                if logprob is not None:
                    entries.append((token, *logprob))
                if stream.stopped:
                    request.cancel()
                if delta:
                    given += len(entries)
                    yield delta, None, entries
                    entries = []
            elif kind == "done":
                _, ids, logprobs = event
                if not request.tokens:  # no token events came: the text is all new
                    stream.ids = list(ids)
                if stream.stopped:  # tokens generated after the stop string are not the answer's
                    ids, logprobs = ids[: len(stream.ids)], logprobs[: len(stream.ids)]
                yield stream.rest(), ids, list(logprobs[given:])
                return
            elif kind == "error":
                raise GenerationFailed(event[1])
            elif kind == "unavailable":  # queued when the server began to shut down
                raise ShuttingDown(event[1])
    finally:
        request.cancel()
