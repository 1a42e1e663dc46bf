"""OpenAI-style errors: every refusal the server gives is one of these, never a traceback.

The body follows the OpenAI API ({"error": {"message", "type", "param", "code"}}), so clients such as
the `openai` package raise their usual exception classes (BadRequestError, AuthenticationError, ...).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses: the HTTP status and an OpenAI-style error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}  # e.g. the partial answer of a generation cut short

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code, **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after: int) -> APIError:
    """503 with Retry-After: the queue is full (or the server is stopping); try again later."""
    return APIError(503, message, type="server_overloaded", code="server_busy", headers={"Retry-After": str(retry_after)})
