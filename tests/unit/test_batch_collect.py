"""A batch item's collected files stay within their limits, and a cut is flagged, even when the
guest lies in its listing or keeps a file growing after it."""

from __future__ import annotations

import base64

import pytest

from shoal import batches
from shoal.use_cases import files as file_cases
from tests.unit.fakes import live_session, unit_context
from workers.batch_runner import BatchRunner

MIB = 1 << 20


@pytest.fixture()
def guest_files(monkeypatch):
    """A fake session's /mnt/data: path -> (size its listing says, chunks a download yields)."""
    content: dict[str, tuple[int, object]] = {}
    closed: list[str] = []

    def listing(c, entry, op, **_args):
        assert op == "list"
        return {"files": [{"path": p, "type": "file", "size": s} for p, (s, _) in content.items()]}

    def download(c, entry, path):
        size, chunks = content[path]

        def stream():
            try:
                yield from chunks()
            finally:
                closed.append(path)

        return {"size": size}, stream()

    monkeypatch.setattr(file_cases, "file_op", listing)
    monkeypatch.setattr(file_cases, "download_file", download)
    return content, closed


def test_files_within_the_budget_are_collected_whole(guest_files) -> None:
    content, _closed = guest_files
    content["out/a.txt"] = (5, lambda: iter([b"hello"]))
    c = unit_context()
    files, note = BatchRunner(c, "bat_1")._collect(live_session(c), ["out/*"])
    assert files == {"out/a.txt": base64.b64encode(b"hello").decode()} and note is None


def test_a_file_that_grows_past_the_budget_is_left_out_without_reading_it_all(guest_files):
    content, closed = guest_files

    def endless():
        while True:  # a background process keeps writing after the listing
            yield b"x" * MIB

    content["big.bin"] = (10, endless)  # the listing said 10 bytes
    content["small.bin"] = (3, lambda: iter([b"abc"]))
    c = unit_context()
    files, note = BatchRunner(c, "bat_1")._collect(live_session(c), ["*.bin"])
    assert set(files) == {"small.bin"}
    assert "big.bin" in note and "left out" in note
    assert "big.bin" in closed  # the stream was stopped, not read to its end


def test_files_over_the_budget_or_count_are_left_out_and_the_item_says_so(guest_files) -> None:
    content, _closed = guest_files
    size = batches.MAX_COLLECT_BYTES - 1
    content["a.bin"] = (size, lambda: iter([b"a" * size]))
    content["b.bin"] = (2 * MIB, lambda: iter([b"b"]))
    c = unit_context()
    files, note = BatchRunner(c, "bat_1")._collect(live_session(c), ["*.bin"])
    assert list(files) == ["a.bin"] and "1 file(s) left out" in note
    view = batches.item_view(c.redis, {"index": 0, "status": "succeeded", "files": files,
                                       "files_truncated": True, "error": note})  # fmt: skip
    assert view["files_truncated"] is True and view["error"] == note
