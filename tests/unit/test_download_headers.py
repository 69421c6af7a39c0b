"""A download's Content-Disposition carries the guest's file name, which is hostile input: no
control character, quote, backslash or line break reaches the header raw (the API fuzz found a
file named "\\x10j" that made gunicorn refuse the answer with a 500)."""

from __future__ import annotations

import urllib.parse

import pytest

from api.v1_files import attachment


@pytest.mark.parametrize(
    "name", ["data.csv", "\x10j", 'a"b\\c', "r\r\nX-Evil: 1", "é.txt", "\udcff", "", "\x7f"]
)
def test_the_header_is_printable_ascii_and_keeps_the_exact_name(name: str) -> None:
    header = attachment(name)
    assert all(" " <= c <= "~" for c in header), header
    fallback = header.split('filename="', 1)[1].split('"', 1)[0]
    assert fallback and '"' not in fallback and "\\" not in fallback
    exact = header.rsplit("filename*=UTF-8''", 1)[1]
    assert urllib.parse.unquote(exact) == name.encode("utf-8", "replace").decode()


def test_an_ordinary_name_is_left_as_it_is() -> None:
    assert attachment("report.pdf") == (
        "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
    )
