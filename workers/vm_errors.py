"""Errors of the host VM driver (workers/vm*.py and friends).

They are plain exceptions with a message written for the operator; shoal/errors.py maps them
to client-facing codes. Every subclass of VMError means "this VM operation failed"; only
VMLost means "the session's state is gone".
"""

from __future__ import annotations


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
