"""Webhook signing, the SSRF check, the retry schedule, sealed secrets and batch item rules."""

from __future__ import annotations

import base64
import os
import stat
import time

import fakeredis
import pytest
from standardwebhooks import Webhook

from shoal import batches, secrets_box, webhooks
from shoal.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=str(tmp_path), webhook_allow_hosts="127.0.0.1, Trusted.Example")


def test_a_signature_verifies_with_standardwebhooks() -> None:
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    body, now = '{"id":"exe_1","status":"succeeded"}', int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": webhooks.sign(secret, "msg_1", now, body),
    }
    assert Webhook(secret).verify(body, headers) == {"id": "exe_1", "status": "succeeded"}
    with pytest.raises(Exception, match="signature"):
        Webhook(webhooks.new_secret()).verify(body, headers)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
    ],
)
def test_forbidden_addresses(address: str, problem: str) -> None:
    assert problem in (webhooks.address_problem(address) or "")


def test_public_addresses_pass() -> None:
    assert webhooks.address_problem("93.184.216.34") is None
    assert webhooks.address_problem("2606:4700:4700::1111") is None


def test_urls_are_checked_by_what_their_host_resolves_to(settings: Settings) -> None:
    for url in ("http://localhost:9/x", "http://10.0.0.1/", "http://169.254.169.254/latest"):
        with pytest.raises(webhooks.Refused):
            webhooks.check_url(settings, url)
    for url in ("ftp://example.com/", "http:///nohost", "http://a b/", "http://x:99999/",
                "http://[::1", "http://[zz]/"):  # fmt: skip
        with pytest.raises(webhooks.Refused):
            webhooks.check_url(settings, url)
    # Allowed by name only: 127.0.0.1 is listed, `localhost` (which resolves to it) is not.
    assert webhooks.resolve(settings, "http://127.0.0.1:8000/hook")[3] == "127.0.0.1"


def test_retry_delays_grow_with_jitter_and_are_capped() -> None:
    s = Settings(webhook_retry_first_s=5, webhook_retry_max_s=600)
    for attempt, base in ((1, 5), (2, 10), (3, 20), (9, 600), (20, 600)):
        delays = {webhooks.retry_delay(s, attempt) for _ in range(20)}
        assert all(base / 2 <= d <= base for d in delays)
        assert len(delays) > 1
    # The default schedule spans about an hour.
    total, attempts = 0.0, 0
    while total + 600 * 0.75 <= 3600:
        attempts += 1
        total += min(5 * 2 ** (attempts - 1), 600) * 0.75
    assert 9 <= attempts <= 14


def test_the_secret_is_sealed_at_rest(settings: Settings) -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    secret = webhooks.rotate_secret(settings, r, "acme")
    stored = r.get("shoal:tenant:acme:webhook_secret")
    assert secret not in stored and secret[6:] not in stored
    assert webhooks.tenant_secret(settings, r, "acme") == secret
    key_file = secrets_box.key_path(settings)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert webhooks.rotate_secret(settings, r, "acme") != secret
    other = Settings(home=settings.home + "-other")
    with pytest.raises(ValueError, match="server key"):
        webhooks.tenant_secret(other, r, "acme")


@pytest.mark.parametrize(
    ("path", "patterns", "hit"),
    [
        ("a.png", ["*.png"], True),
        ("out/a.png", ["*.png"], False),
        ("out/x.json", ["out/*.json"], True),
        ("out/deep/x.json", ["out/*.json"], False),
        ("out/deep/x.json", ["out/**/*.json"], True),
        ("x.json", ["**/*.json"], True),
        ("r1.csv", ["r?.csv"], True),
        ("rb.csv", ["r[0-9].csv"], False),
    ],
)
def test_collect_globs_match_like_a_shell(path: str, patterns: list[str], hit: bool) -> None:
    assert batches.matches(path, patterns) is hit


def test_batch_items_are_validated_one_by_one(settings: Settings) -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    ok, error = batches.validate_item(
        settings, r, "t", {"code": "1", "files": {"in/a.csv": "YQ=="}, "collect": ["*.txt"]}
    )
    assert error is None and ok["timeout_s"] == settings.default_timeout_s
    bad = [
        ({}, "code"),
        ({"code": "1", "language": "ruby"}, "language"),
        ({"code": "1", "timeout_s": 0}, "timeout_s"),
        ({"code": "1", "files": {"../x": "YQ=="}}, "files"),
        ({"code": "1", "files": {"x": "not base64!"}}, "base64"),
        ({"code": "1", "collect": "*.png"}, "collect"),
        ({"code": "1", "session_id": "ses_nope"}, "session_id"),
        ({"code": "1", "colour": "red"}, "unknown"),
        ("print(1)", "object"),
    ]
    for raw, word in bad:
        spec, error = batches.validate_item(settings, r, "t", raw)
        assert spec is None and word in error, (raw, error)


def test_delivery_rechecks_dns_and_connects_to_the_checked_address(monkeypatch) -> None:
    """DNS rebinding: a host that was public at submission and private at delivery is refused,
    without a retry, and the connection never goes to a name resolved a second time."""
    s = Settings()
    answers = {"hook.example": "93.184.216.34"}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(2, 1, 6, "", (answers[host], port))]

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", fake_getaddrinfo)
    assert webhooks.resolve(s, "https://hook.example/x")[3] == "93.184.216.34"
    answers["hook.example"] = "10.0.0.7"
    status, error, retry = webhooks.post_once(s, "https://hook.example/x", {}, b"{}")
    assert status is None and "10.0.0.7" in error and retry is False
