"""Verifying Shoal's webhook callbacks (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
`webhook-signature`, HMAC-SHA256 with the tenant's `whsec_...` secret). Needs the
`standardwebhooks` package: `pip install 'shoal-client[webhooks]'`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoal_client.errors import ShoalError


class InvalidWebhook(ShoalError):
    """The signature does not match, the timestamp is over 5 minutes off, or a header is missing."""


def verify(secret: str, body: str | bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """The callback's payload (an execution or a batch object) once its signature and timestamp
    check out; InvalidWebhook otherwise. Deduplicate on `headers["webhook-id"]`: retries of one
    callback carry the same id."""
    try:
        from standardwebhooks import Webhook, WebhookVerificationError
    except ImportError:
        raise ShoalError(
            "MissingDependency", "pip install 'shoal-client[webhooks]' (standardwebhooks)"
        ) from None
    text = body.decode() if isinstance(body, bytes) else body
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        return Webhook(secret).verify(text, lowered)
    except WebhookVerificationError as exc:
        raise InvalidWebhook("InvalidWebhook", str(exc) or "signature mismatch") from None
