"""Errors of the host VM driver (workers/vm*.py and friends).

They are plain exceptions with a message written for the operator; shoal/errors.py maps them
to client-facing codes. Every subclass of VMError means "this VM operation failed"; only
VMLost means "the session's state is gone".
"""

from __future__ import annotations

import errno


class VMError(Exception):
    """A VM operation failed."""

    libvirt_code: int | None = None  # libvirt's error code, when libvirt raised it

    def __init__(self, message: str = "") -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        self.message = message or (self.__doc__ or "").strip()


class VMStartFailed(VMError):
    """A VM could not be started, or its agent never answered."""


class VMLost(VMError):
    """The VM died or cannot be trusted again (its owner destroys it); its state is gone."""


class AgentRefused(VMError):
    """The guest agent refused a request (invalid argument, busy, ...). The VM is intact."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"the agent refused the request: {code}: {message}")
        self.code = code
        self.agent_message = message


class TemplateError(VMError):
    """A snapshot template could not be built or used."""


class LibvirtUnavailable(VMError):
    """libvirtd cannot be reached."""


def out_of_space(exc: BaseException) -> bool:
    """True when `exc` says the host's disk is full (an OSError, or a tool's or libvirt's
    message): no VM can start until space is freed, and no template is to blame."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text
