"""Shoal's Python client (distribution `shoal-client`): `Client` and `AsyncClient`."""

from shoal_client._core import batch_item
from shoal_client.async_client import AsyncClient, AsyncSession
from shoal_client.client import Client, Session
from shoal_client.errors import (
    ExecutionFailed,
    NotFound,
    RateLimited,
    ShoalError,
    Unauthorized,
    Unavailable,
)
from shoal_client.models import BatchItem, Execution, FileEntry, SessionInfo

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "BatchItem",
    "Client",
    "Execution",
    "ExecutionFailed",
    "FileEntry",
    "NotFound",
    "RateLimited",
    "Session",
    "SessionInfo",
    "ShoalError",
    "Unauthorized",
    "Unavailable",
    "batch_item",
]
