"""The HTTP answer service as one FastAPI application: the endpoints (:mod:`.routes`: ``POST
/api/answer``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``, ``GET
/v1/models``) plus the web page at ``GET /``.

Client mistakes never reach the model: malformed JSON is a 400, a missing/empty field, a wrong
type or an out-of-range value a 422 naming the field (:mod:`.schemas`), a prompt plus token budget
beyond the model's positions a 422 stating the limit. Errors have OpenAI's shape (:mod:`.errors`):
``{"error": {"message", "type", "param"}}``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse

from megatron_yuyuan.prompts import DEFAULT_TEMPLATE, PromptTemplate
from megatron_yuyuan.serve.batcher import Batcher
from megatron_yuyuan.serve.errors import APIError, error_response, validation_error
from megatron_yuyuan.serve.routes import Service, router


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
    service = Service(batcher, tokenizer, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="megatron_yuyuan QA server", lifespan=lifespan)
    app.state.service = service
    app.include_router(router)
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

    page = (
        resources.files("megatron_yuyuan.serve")
        .joinpath("static/index.html")
        .read_text(encoding="utf-8")
        .replace("{{MODEL}}", html.escape(model.name))
        .replace("{{SOURCE}}", html.escape(model.source))
        .replace("{{LAYOUT}}", html.escape(model.layout))
        .replace("{{MAX_POSITIONS}}", str(service.max_positions))
        .replace("{{DEFAULT_TOKENS}}", str(service.default_budget))
    )

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app
