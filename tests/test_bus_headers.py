"""Our parser of a NATS message's header block (installed in nats-py's place: workers parse a request's
headers on every request) gives nats-py's own result for every input: names that are not tokens skipped,
values stripped, bad UTF-8 replaced, lines without a colon ignored."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.runtime import bus

nats_parse = bus.NATS_PARSE_HEADER_LINES.__func__  # nats-py's own (a staticmethod)

CASES = [
    b"Inferbus-Request-Id: chatcmpl-1\r\nInferbus-Bundle: 1\r\nInferbus-Deadline: 1764000000000\r\n\r\n",
    b"Name:Value\r\nTabbed:\tvalue\t\r\n  Padded  :  both  \r\n",
    b"no colon here\r\n\r\n:empty name\r\nA: b: c\r\n",
    b"Bad Name: x\r\nBad\x1fName: y\r\nBad\x0bName: z\r\nOk-Name: w\r\n",
    b"Caf\xc3\xa9: non-ascii name\r\nUtf8: caf\xc3\xa9\r\nBroken: \xff\xfe\r\n",
    b"Dup: 1\r\nDup: 2\r\n",
    b"\r\n\r\n\r\n",
    b"",
    b"Lone\nLF: v\r\nCR\rIn: v\r\n",
]


def test_known_header_blocks_parse_as_nats_py_parses_them() -> None:
    for raw in CASES:
        assert bus.parse_header_lines(raw) == nats_parse(raw), raw


def test_nats_py_uses_our_parser() -> None:
    assert bus.Connection._parse_header_lines is bus.parse_header_lines  # bus.Connection: nats-py's Client


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.sampled_from([b":", b": ", b"", b":\t", b" : "]),
                          st.binary(max_size=16)), max_size=6))
def test_any_header_block_parses_as_nats_py_parses_it(lines: list[tuple[bytes, bytes, bytes]]) -> None:
    raw = b"\r\n".join(name + sep + value for name, sep, value in lines) + b"\r\n\r\n"
    assert bus.parse_header_lines(raw) == nats_parse(raw)
