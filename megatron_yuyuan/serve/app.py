"""The HTTP answer service as one FastAPI application: the endpoints (:mod:`.routes`: ``POST
/api/answer``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``, ``GET
/v1/models``; ``GET /metrics``) plus the web page at ``GET /``.

With an API key every endpoint but ``/health`` (and the page itself, which asks for the key) needs
``Authorization: Bearer KEY``; the key is compared in constant time (of SHA-256 digests, so not
even its length leaks), anything else is a 401.

Client mistakes never reach the model: malformed JSON is a 400, a missing/empty field, a wrong
type or an out-of-range value a 422 naming the field (:mod:`.schemas`), a prompt plus token budget
beyond the model's positions a 422 stating the limit. Errors have OpenAI's shape (:mod:`.errors`):
``{"error": {"message", "type", "param"}}``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response

from megatron_yuyuan.prompts import DEFAULT_TEMPLATE, PromptTemplate
from megatron_yuyuan.serve.errors import APIError, error_response, validation_error
from megatron_yuyuan.serve.metrics import Metrics
from megatron_yuyuan.serve.routes import Service, router
from megatron_yuyuan.serve.scheduler import Scheduler

OPEN_PATHS = ("/health", "/")
"""What answers without the API key: the liveness probe, and the page (which asks for it)."""


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
    decoding: dict = field(default_factory=dict)
    """The decoding settings its run's end-of-training evaluation used (``max_new_tokens``,
    ``repetition_penalty``, ``no_repeat_ngram_size``): the defaults of the page and the API."""


def origin_allowed(origin: str, host: str, allowed: Sequence[str]) -> bool:
    """The page's own origin (same host:port as the request), or one listed."""
    if "*" in allowed or origin in allowed:
        return True
    return origin.split("://", 1)[-1].rstrip("/") == host


def key_matches(given: str, key: str) -> bool:
    """Constant time, whatever the lengths."""
    digest = lambda text: hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()  # noqa: E731
    return hmac.compare_digest(digest(given), digest(key))


def create_app(
    scheduler: Scheduler,
    tokenizer,
    model: ServedModel,
    allowed_origins: Sequence[str] = (),
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI application over a scheduler (its thread starts with the app).

    A request whose ``Origin`` is another site than the server's own (a page the user visits
    posting a cross-site ``text/plain`` form, which browsers send without asking) is refused
    with 403 unless ``allowed_origins`` lists it (``*``: any). With ``api_key``, see the module
    docstring."""
    metrics = scheduler.metrics or Metrics()
    scheduler.metrics = metrics
    service = Service(scheduler, tokenizer, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await scheduler.stop()

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

    @app.middleware("http")
    async def key_required(request: HTTPRequest, call_next):
        # the routed path itself (a Host header cannot make url.path differ from it)
        if api_key and request.scope["path"] not in OPEN_PATHS:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(given.strip(), api_key):
                return error_response(
                    401,
                    "this server needs its API key: send the header Authorization: Bearer KEY",
                    "authorization",
                    {"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    known = {route.path for route in router.routes} | {"/", "/metrics"}

    @app.middleware("http")  # added last: runs first, so refusals above are counted too
    async def count(request: HTTPRequest, call_next):
        response = await call_next(request)
        path = request.scope["path"] if request.scope["path"] in known else "other"
        metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    async def scrape():
        return Response(metrics.render(), media_type=metrics.content_type)

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
        .replace("{{REPETITION_PENALTY}}", f"{service.defaults['repetition_penalty']:g}")
        .replace("{{NO_REPEAT_NGRAM_SIZE}}", str(service.defaults["no_repeat_ngram_size"]))
        .replace("{{KEY_HIDDEN}}", "" if api_key else "hidden")
    )

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app
