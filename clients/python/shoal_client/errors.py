"""What the client raises: every API error carries Shoal's error code and message."""

from __future__ import annotations


class ShoalError(Exception):
    """An error answer of the API (`{"error": {"code", "message"}}`), or a client-side failure
    (code `ConnectionFailed`, status 0) after the retries were spent."""

    def __init__(
        self, code: str, message: str, status: int = 0, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}" if status == 0 else f"{status} {code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


class NotFound(ShoalError):
    """404: no such session, execution, file or pool (or another tenant's)."""


class Unauthorized(ShoalError):
    """401 or 403: a missing, wrong or revoked key, or one of the wrong kind."""


class RateLimited(ShoalError):
    """429: over a rate or a cap; `retry_after_s` says when to try again."""


class Unavailable(ShoalError):
    """503: no host, Redis restarting, a host's disk full; `retry_after_s` when given."""


class ExecutionFailed(ShoalError):
    """Raised by `Execution.raise_for_status()` for code that raised, timed out or was lost."""


BY_STATUS: dict[int, type[ShoalError]] = {
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    429: RateLimited,
    503: Unavailable,
}


def from_response(status: int, body: object, retry_after: str | None) -> ShoalError:
    """The exception for an error answer; a body not in Shoal's shape is named as such."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code, message = error["code"], str(error.get("message", ""))
    else:
        code, message = "UnexpectedResponse", f"HTTP {status} without Shoal's error body"
    try:
        delay = float(retry_after) if retry_after else None
    except ValueError:
        delay = None
    return BY_STATUS.get(status, ShoalError)(code, message, status, delay)
