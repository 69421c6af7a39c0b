"""How much structure a JSON request body may hold, checked on its bytes before it is parsed.

Parsing costs memory by the number of values, not by the body's size: `[[],[],...]` takes ~20
times its size once parsed, and brackets nested thousands deep end Python's parser in a
RecursionError. So before any parser sees a body, a scan at C speed (bytes methods and one regular
expression, no Python loop over the body) counts what lies outside its strings:

- values: 1 + the `[`, `{`, `,` and `:` outside strings, which is at least the number of array
  elements, object members and object keys; over MAX_JSON_VALUES is 413 `PayloadTooLarge`;
- depth: the deepest nesting of arrays and objects; over MAX_JSON_DEPTH is 400 `ValidationFailed`;
- surrogates: a `\\u` escape of a UTF-16 surrogate without its pair is 400 `ValidationFailed`
  (it decodes to no character: the guest agent's UTF-8 frames could not carry it);
- numbers: a run of more than MAX_JSON_NUMBER_DIGITS digits outside strings is 400
  `ValidationFailed` (Python's parser refuses an integer of over 4,300 digits with an error of its
  own, and Shoal's numbers have at most a few dozen).

A body that is not valid JSON may be counted wrongly here; the parser then refuses it with a 400.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

from shoal.errors import PayloadTooLarge, ValidationFailed

# Shoal's requests nest 4 levels at most (a batch's items' files); 64 leaves room for clients
# that wrap them and stays far below the parser's recursion limit (~1000).
MAX_JSON_DEPTH = 64
# A full batch (1,000 items) with every field, 20 collect patterns and 100 files an item counts
# ~230,000; parsed, 250,000 values cost ~20 MiB at worst (each an empty list).
MAX_JSON_VALUES = 250_000
# Digits in a row in a number; every number Shoal takes fits in 20.
MAX_JSON_NUMBER_DIGITS = 100

# With escaped backslashes and escaped quotes removed first, a string is a quote, anything but
# a quote, and a quote.
_STRING = re.compile(rb'"[^"]*"')
# Looked for only where a run of digits starts: linear in the body, not quadratic in a run.
_LONG_NUMBER = re.compile(rb"(?<![0-9])[0-9]{%d}" % (MAX_JSON_NUMBER_DIGITS + 1))
# With escaped backslashes removed, every \u is an escape: a high surrogate followed by a low
# one is a character; any other surrogate escape is not.
_SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},:")
# '[' and '{' go one level down, ']' and '}' one up (0xff is -1 in a signed byte array).
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def check_json_shape(body: bytes) -> None:
    """PayloadTooLarge for a body with more than MAX_JSON_VALUES values, ValidationFailed for
    one nested deeper than MAX_JSON_DEPTH or with a number of more than MAX_JSON_NUMBER_DIGITS
    digits; None when the parser may be given the body."""
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    if b"\\u" in unescaped and _LONE_SURROGATE.search(_SURROGATE_PAIR.sub(b"", unescaped)):
        raise ValidationFailed(
            "the JSON body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
            "pair): it is no character, and no UTF-8 text can hold it"
        )
    # Every string is a key or a value: too many quotes is too many values, found before the
    # regular expression has to visit each string.
    if unescaped.count(b'"') // 2 > MAX_JSON_VALUES:
        raise _too_many()
    bare = _STRING.sub(b"", unescaped)
    del unescaped
    if _LONG_NUMBER.search(bare):
        raise ValidationFailed(
            f"the JSON body holds a number of more than {MAX_JSON_NUMBER_DIGITS} digits"
        )
    structure = bare.translate(None, _NOT_STRUCTURE)
    del bare
    values = 1 + len(structure) - structure.count(b"]") - structure.count(b"}")
    if values > MAX_JSON_VALUES:
        raise _too_many()
    brackets = structure.translate(None, b",:")
    if len(brackets) <= MAX_JSON_DEPTH:
        return
    steps = array("b", brackets.translate(_DEPTH_STEP))
    if max(accumulate(steps)) > MAX_JSON_DEPTH:
        raise ValidationFailed(
            f"the JSON body is nested too deeply: at most {MAX_JSON_DEPTH} levels of arrays "
            "and objects"
        )


def _too_many() -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the JSON body holds too many values: at most {MAX_JSON_VALUES} array elements, object "
        "members and keys"
    )
