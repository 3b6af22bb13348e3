"""The one error type of the server: an HTTP status plus an OpenAI-shaped JSON body.

    raise ApiError(400, "max_tokens must be >= 0 (got -1)", param="max_tokens")
    # -> 400 {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Raised by the request parser, the engine's admission (a full queue, a request larger than the cache) and the
HTTP layer (authentication, body size); the app turns it into a response, so a bad request never reaches the
model and never stops the server.
"""

from __future__ import annotations

from moelab.errors import MoelabError

#: OpenAI's error ``type`` for each status the server answers with.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "overloaded_error", 504: "timeout_error"}


class ApiError(MoelabError):
    """An error answered as ``status`` with ``{"error": {...}}``; ``headers`` go out with it (``Retry-After``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


__all__ = ["TYPES", "ApiError"]
