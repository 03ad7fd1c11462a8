"""How failures reach a client: OpenAI's error shape ``{"error": {"message", "type", "param"}}``
with the status that says whose fault it is (400 malformed, 401 no or a wrong API key, 413 too
large, 422 a field the schema or the limits refuse, 503 busy or shutting down, 500 a generation
that failed)."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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
    def __init__(self, status: int, message: str, param: str | None = None, headers=None):
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None, headers=None):
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
    }
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


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
