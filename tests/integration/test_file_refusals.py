"""Only regular files move, through real HTTP, Redis, the host worker and a guest: a symbolic
link, a FIFO or a directory that user code made in /mnt/data is refused with a 400 in the error
shape in under a second, on the /v1 routes and the dynamic-sessions routes, for downloads and
uploads. (Before, a FIFO or link download held an API thread for 60 s and ended in a 500.)

One session serves every case: made by the dynamic-sessions routes, reached by /v1 by its id.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from collections.abc import Iterator

import pytest
import requests

from tests.integration.conftest import Stack

AT_ONCE_S = 1.0
CURRENT = "2025-02-02-preview"
LEGACY = "2024-02-02-preview"

MAKE_SPECIALS = """
import os
os.chdir('/mnt/data')
with open('plain.txt', 'w') as f:
    f.write('plain')
os.symlink('plain.txt', 'link-inside')
os.symlink('/etc/passwd', 'link-outside')
os.mkfifo('fifo')
os.mkdir('dir')
sorted(os.listdir('.'))
"""

# name -> the error code its download and upload get
REFUSED = {
    "link-inside": "NotARegularFile",
    "link-outside": "NotARegularFile",
    "fifo": "NotARegularFile",
    "dir": "NotAFile",
}


class Session:
    """The one session, and the routes that reach it."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.identifier = f"refusals-{secrets.token_hex(4)}"
        self.pool_url = f"{stack.url}/pools/default"
        listing = requests.get(
            f"{self.pool_url}/files",
            params=self.params(),
            headers=stack.headers(),
            timeout=180,
        )  # the first use of an identifier makes its session
        assert listing.status_code == 200, listing.text
        sessions = requests.get(
            f"{stack.url}/v1/sessions", headers=stack.headers(), timeout=10
        ).json()["sessions"]
        (self.id,) = [s["id"] for s in sessions if s["identifier"] == self.identifier]

    def params(self, version: str = CURRENT) -> dict[str, str]:
        return {"identifier": self.identifier, "api-version": version}

    def download_routes(self, name: str) -> list[tuple[str, dict]]:
        return [
            (f"{self.stack.url}/v1/sessions/{self.id}/files/{name}", {}),
            (f"{self.pool_url}/files/{name}/content", self.params()),
            (f"{self.pool_url}/files/content/{name}", self.params(LEGACY)),
        ]


@pytest.fixture(scope="module")
def session(stack: Stack) -> Iterator[Session]:
    s = Session(stack)
    made = stack.execute(s.id, MAKE_SPECIALS)
    assert made["status"] == "succeeded", made
    yield s
    gone = requests.delete(f"{stack.url}/v1/sessions/{s.id}", headers=stack.headers(), timeout=60)
    assert gone.status_code == 204, gone.text  # its VM back for the other tests


def assert_refused(response: requests.Response, elapsed: float, code: str, what: str) -> None:
    assert response.status_code == 400, (what, response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json"), what
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["message"], (what, error)
    assert error["code"] == code and response.headers["x-ms-error-code"] == code, (what, error)
    assert elapsed < AT_ONCE_S, (what, f"{elapsed:.2f} s")


def timed(method: str, url: str, **kwargs) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.request(method, url, timeout=30, **kwargs)
    return response, time.monotonic() - started


def test_downloads_of_links_fifos_and_directories_are_refused_at_once(
    stack: Stack, session: Session
) -> None:
    for name, code in REFUSED.items():
        for url, params in session.download_routes(name):
            response, elapsed = timed("GET", url, params=params, headers=stack.headers())
            assert_refused(response, elapsed, code, url)
    # The session is unharmed: a regular file downloads, the FIFO is still a FIFO.
    for url, params in session.download_routes("plain.txt"):
        response, _ = timed("GET", url, params=params, headers=stack.headers())
        assert response.status_code == 200 and response.content == b"plain", url
    check = stack.execute(
        session.id, "import os, stat; stat.S_ISFIFO(os.lstat('/mnt/data/fifo').st_mode)"
    )
    assert check["result"]["text/plain"] == "True", check


def test_uploads_onto_links_fifos_and_directories_are_refused(
    stack: Stack, session: Session
) -> None:
    for name, code in REFUSED.items():
        response, elapsed = timed(
            "PUT",
            f"{stack.url}/v1/sessions/{session.id}/files/{name}",
            data=b"overwritten",
            headers=stack.headers(),
        )
        assert_refused(response, elapsed, code, f"PUT {name}")
        response, elapsed = timed(
            "POST",
            f"{session.pool_url}/files",
            params=session.params(),
            files={"file": (name, b"overwritten")},
            headers=stack.headers(),
        )
        assert_refused(response, elapsed, code, f"POST {name}")
    kept = stack.execute(
        session.id,
        "import os\n[os.readlink('/mnt/data/link-outside'), open('/mnt/data/plain.txt').read()]",
    )
    assert kept["result"]["text/plain"] == "['/etc/passwd', 'plain']", kept


def test_many_fifo_downloads_at_once_hold_no_api_thread(stack: Stack, session: Session) -> None:
    # Before, each held an API thread for 60 s: 32 of them took every thread.
    urls = [route for _ in range(16) for route in session.download_routes("fifo")]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        responses = list(
            pool.map(
                lambda route: requests.get(
                    route[0], params=route[1], headers=stack.headers(), timeout=30
                ),
                urls,
            )
        )
    assert [r.status_code for r in responses] == [400] * len(urls)
    assert time.monotonic() - started < 15  # 48 refusals, serialised per session on the host
    response, elapsed = timed(
        "GET", f"{stack.url}/v1/sessions/{session.id}/files/fifo", headers=stack.headers()
    )
    assert_refused(response, elapsed, "NotARegularFile", "after the burst")
