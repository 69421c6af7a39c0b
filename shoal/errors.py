"""Errors as values with codes, defined once. api/errors.py maps them to HTTP in one place."""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error a client may see. `code` is stable; `message` says what is wrong;
    `retry_after_s`, when set, is sent as the answer's Retry-After header."""

    code = "InternalError"
    status = 500
    retry_after_s: int | None = None

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__doc__ or self.code)
        self.message = message or (self.__doc__ or self.code).strip()


class ValidationFailed(ShoalError):
    """The request is malformed."""

    code, status = "ValidationFailed", 400


class Unauthorized(ShoalError):
    """A valid API key is required: send `Authorization: Bearer <key>`."""

    code, status = "Unauthorized", 401


class Forbidden(ShoalError):
    """A valid key that may not call this route (an admin key on a tenant route, a tenant key
    on an admin route)."""

    code, status = "Forbidden", 403


class SessionNotFound(ShoalError):
    """No such session."""

    code, status = "SessionNotFound", 404


class SessionExpired(ShoalError):
    """The session expired after being idle and its state is gone."""

    code, status = "SessionExpired", 404


class ExecutionNotFound(ShoalError):
    """No such execution."""

    code, status = "ExecutionNotFound", 404


class BatchNotFound(ShoalError):
    """No such batch."""

    code, status = "BatchNotFound", 404


class PoolNotFound(ShoalError):
    """No such pool."""

    code, status = "PoolNotFound", 404


class FileNotFoundInSession(ShoalError):
    """No such file in the session."""

    code, status = "FileNotFound", 404


class SessionLost(ShoalError):
    """The session's VM or host died; its state is gone. Create a new session."""

    code, status = "SessionLost", 409


class SessionBusy(ShoalError):
    """The session is busy."""

    code, status = "SessionBusy", 409


class UnsupportedMediaType(ShoalError):
    """Send the body as JSON with `Content-Type: application/json`."""

    code, status = "UnsupportedMediaType", 415


class NotAcceptable(ShoalError):
    """The request's Accept names no type the route answers in."""

    code, status = "NotAcceptable", 406


class PayloadTooLarge(ShoalError):
    """The request body is over the size limit."""

    code, status = "PayloadTooLarge", 413


class URITooLong(ShoalError):
    """The request's URL is over the length limit."""

    code, status = "URITooLong", 414


class HeadersTooLarge(ShoalError):
    """The request's headers are over the size limit."""

    code, status = "RequestHeaderFieldsTooLarge", 431


class TooManyRequests(ShoalError):
    """A fair-share bound was hit: try again later. `retry_after_s` (at least 1) is the
    response's Retry-After: when a token will be there for the rate limit; 1 for the caps, whose
    room comes back whenever one of the tenant's sessions, executions or waits ends (the rate
    limit bounds how often a client can ask again)."""

    code, status = "TooManyRequests", 429

    def __init__(self, message: str = "", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = max(int(retry_after_s), 1)


class RateLimited(TooManyRequests):
    """The tenant is over its request rate."""

    code = "RateLimited"


class TooManyPendingExecutions(TooManyRequests):
    """The session or the tenant has as many unfinished executions as it may have."""

    code = "TooManyPendingExecutions"


class TooManyWaits(TooManyRequests):
    """The tenant has as many requests waiting for an execution as it may have."""

    code = "TooManyWaits"


class TenantSessionLimit(TooManyRequests):
    """The tenant has as many live sessions as it may have."""

    code = "TenantSessionLimit"


class PoolExhausted(TooManyRequests):
    """The pool is at its session limit."""

    code = "PoolExhausted"


class TenantStorageFull(TooManyRequests):
    """The tenant holds as many bytes in Shoal's Redis as it may (shoal/storage.py): its
    `retry_after_s` is when the first of its records expires."""

    code = "TenantStorageFull"


class StorageFull(ShoalError):
    """All tenants' data in Shoal's Redis is at its share of Redis's memory: the rest is kept
    for the service's own writes. Not the tenant's doing, so a 503, with a Retry-After."""

    code, status = "StorageFull", 503

    def __init__(self, message: str = "", retry_after_s: int = 60) -> None:
        super().__init__(message)
        self.retry_after_s = max(int(retry_after_s), 1)


class StoreUnavailable(ShoalError):
    """Shoal's Redis does not answer (it is restarting or down): nothing was done; retry
    shortly. Not the client's doing, so a 503, with a Retry-After."""

    code, status = "StoreUnavailable", 503
    retry_after_s = 2


class HostStorageFull(ShoalError):
    """The host has no disk space left in its VM directory for a new VM (nothing was started)
    or for an upload's bytes on their way in (the file is unchanged): retry once the operator
    has freed space. A 503, with a Retry-After."""

    code, status = "HostStorageFull", 503
    retry_after_s = 30


class TooManyBatches(ShoalError):
    """The tenant has as many unfinished batches as it may have."""

    code, status = "TooManyBatches", 429
    retry_after_s = 30  # a hint: a batch's length is not known in advance


class NoHostAvailable(ShoalError):
    """No worker host is up to run the session."""

    code, status = "NoHostAvailable", 503


class SleepNotEnabled(ShoalError):
    """The session's pool does not keep sleeping sessions (its on_idle is "destroy")."""

    code, status = "SleepNotEnabled", 409


class SleepingHostDown(ShoalError):
    """The session sleeps on a host that is not answering: it is kept, not lost; retry once the
    host is back."""

    code, status = "SessionHostUnavailable", 503
    retry_after_s = 30


class ForkFailed(ShoalError):
    """The session's host could not make its forks (the worker's log says why): none was made,
    the session runs on as it was."""

    code, status = "ForkFailed", 503
    retry_after_s = 5


class HostTimeout(ShoalError):
    """The session's host did not answer in time."""

    code, status = "HostTimeout", 504


class PathNotAllowed(ShoalError):
    """The path is outside the session's /mnt/data."""

    code, status = "PathNotAllowed", 400


class NotAFile(ShoalError):
    """The path is a directory, or a file where a directory was expected."""

    code, status = "NotAFile", 400


class NotARegularFile(ShoalError):
    """The path is a symbolic link, FIFO, socket or device: only regular files are read or
    written (links are never followed)."""

    code, status = "NotARegularFile", 400


class DirectoryNotEmpty(ShoalError):
    """The directory is not empty."""

    code, status = "DirectoryNotEmpty", 409


class NoSpace(ShoalError):
    """The session's disk is full."""

    code, status = "InsufficientStorage", 507


# The guest agent's error codes (shoal/protocol.py), as client-facing errors.
AGENT_ERRORS: dict[str, type[ShoalError]] = {
    "path_outside_data": PathNotAllowed,
    "not_found": FileNotFoundInSession,
    "is_a_directory": NotAFile,
    "not_a_directory": NotAFile,
    "no_space": NoSpace,
    "invalid_argument": ValidationFailed,
    "directory_not_empty": DirectoryNotEmpty,
    "permission_denied": PathNotAllowed,
    "not_a_regular_file": NotARegularFile,
    "busy": SessionBusy,
}


def from_agent(code: str, message: str) -> ShoalError:
    return AGENT_ERRORS.get(code, ShoalError)(message)
