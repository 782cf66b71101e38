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


SEPARATORS = st.sampled_from([b":", b": ", b"", b":\t", b" : ", b"\x0b:\x0c"])
# Bytes that matter to a header line: blanks, CR and LF, separators, what str.isspace calls whitespace.
TRICKY = st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\x0b", b"\x0c", b"\x1c", b"\x1f", b":", b"a", b"Z",
                                   b"-", b"\xff", b"\xc3\xa9", b"\x00"]), max_size=8).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), SEPARATORS, st.binary(max_size=16)), max_size=6))
def test_any_header_block_parses_as_nats_py_parses_it(lines: list[tuple[bytes, bytes, bytes]]) -> None:
    raw = b"\r\n".join(name + sep + value for name, sep, value in lines) + b"\r\n\r\n"
    assert bus.parse_header_lines(raw) == nats_parse(raw)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.tuples(st.one_of(TRICKY, st.text(alphabet="abcXYZ-_0123456789", max_size=10).map(str.encode)),
                          SEPARATORS, TRICKY), max_size=6), st.sampled_from([b"\r\n\r\n", b"\r\n", b"", b" "]))
def test_ascii_and_awkward_header_blocks_parse_as_nats_py_parses_them(lines: list[tuple[bytes, bytes, bytes]],
                                                                      end: bytes) -> None:
    """Mostly plain ASCII lines with blanks, bare CR or LF and odd bytes where they hurt most."""
    raw = b"\r\n".join(name + sep + value for name, sep, value in lines) + end
    assert bus.parse_header_lines(raw) == nats_parse(raw)


PLAIN = st.lists(st.sampled_from([b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x1f", b":", b"a", b"Z", b"-", b"\x00",
                                  b"\x7f"]), max_size=8).map(b"".join)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.tuples(PLAIN, SEPARATORS, PLAIN), max_size=6), st.sampled_from([b"\r\n\r\n", b"\r\n", b""]))
def test_plain_ascii_header_blocks_parse_as_nats_py_parses_them(lines: list[tuple[bytes, bytes, bytes]],
                                                                end: bytes) -> None:
    """ASCII with CR and LF only as line ends (what our services send): blanks of every kind around names and
    values, whitespace inside names, empty names and values."""
    raw = b"\r\n".join(name + sep + value for name, sep, value in lines) + end
    assert raw.isascii() and raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")
    assert bus.parse_header_lines(raw) == nats_parse(raw)
