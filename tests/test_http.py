"""The relay's HTTP request-head parser, held against h11 (the oracle) on the same random heads.

Hypothesis builds request heads, mostly well-formed and broken in the ways that matter (bad
methods, targets and versions, illegal header names and values, obsolete line folding, missing or
repeated Host, conflicting or malformed Content-Length, Transfer-Encoding, bare LF line ends), and
both parsers must agree: the same method, target, version and headers, or a refusal with the same
status. One difference is intended: a chunked body, which h11 would decode and the relay refuses
with 411 (its clients send a Content-Length).
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import HttpError, parse_head

methods = st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "get", "M-SEARCH"]) | st.text(
    st.sampled_from("GETPOS \t/\x00é"), min_size=0, max_size=6
)
targets = st.sampled_from(["/", "/ws", "/ws?token=abc", "/%2e%2e/x", "*", "http://h/p"]) | st.text(
    st.characters(min_codepoint=0, max_codepoint=0xFF), min_size=0, max_size=8
)
versions = st.sampled_from(["1.1", "1.0", "1.1", "2.0", "0.9", "1", "1.12", "x.y"])
names = st.sampled_from(
    ["Host", "host", "Content-Length", "Transfer-Encoding", "Upgrade", "Connection", "X-Forwarded-For", "Origin"]
) | st.text(st.sampled_from("abcXY-_:;@ \t\x00"), min_size=0, max_size=6)
values = st.sampled_from(
    [
        "",
        "x",
        " padded ",
        "websocket",
        "Upgrade, keep-alive",
        "12",
        "12, 12",
        "12, 13",
        "-1",
        "chunked",
        "CHUNKED",
        "gzip",
        "a\tb",
        "0" * 21,
        "1" * 20,
    ]
) | st.text(st.characters(min_codepoint=0, max_codepoint=0xFF, blacklist_characters="\r\n"), max_size=10)


@st.composite
def heads(draw) -> bytes:
    line_end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    request_line = f"{draw(methods)} {draw(targets)} HTTP/{draw(versions)}".encode("latin-1")
    lines = [request_line]
    if draw(st.booleans()):
        lines.append(b"Host: relay.example")
    for _ in range(draw(st.integers(0, 5))):
        name, value = draw(names), draw(values)
        lines.append(f"{name}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}{value}".encode("latin-1"))
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from([b" folded", b"\tfolded too", b" "])))  # obsolete line folding
    return line_end.join(lines) + line_end + line_end


def h11_verdict(head: bytes) -> tuple:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return ("refused", exc.error_status_hint)
    assert isinstance(event, h11.Request), event
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return (event.method.decode(), event.target.decode(), event.http_version.decode(), headers)


def our_verdict(head: bytes) -> tuple:
    try:
        method, target, version, headers, _ = parse_head(head)
    except HttpError as exc:
        return ("refused", exc.status)
    return (method, target, version, headers)


@settings(max_examples=3000, deadline=None)
@given(head=heads())
def test_the_head_parser_agrees_with_h11(head):
    theirs, ours = h11_verdict(head), our_verdict(head)
    if ours == ("refused", 411):  # chunked: h11 would read the body, the relay asks for a Content-Length
        assert theirs[0] != "refused" and theirs[3]["transfer-encoding"] == "chunked", theirs
        return
    assert ours == theirs


def test_the_content_length_is_returned_and_checked():
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 12, 12\r\n\r\n"
    assert parse_head(head)[4] == 12
    with pytest.raises(HttpError) as exc:
        parse_head(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n")
    assert exc.value.status == 400
