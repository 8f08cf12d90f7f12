"""The relay's WebSocket frame parser, held against wsproto (the oracle) and its own limits.

Hypothesis builds streams of client frames, valid and broken in every way RFC 6455 names (reserved
bits and opcodes, unmasked frames, fragmented or long control frames, stray and missing
continuations, lengths not in their shortest form, close frames with bad codes or reasons, text that
is not UTF-8, fragments that split a character), interleaves control frames with fragments, and
feeds the same bytes, cut at random points, to ``relay.FrameParser`` and to wsproto's server-side
connection. Both must yield the same messages and end with the same close code.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

import relay as relay_mod
from relay import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, FrameParser, WebSocketError

BIG = 1 << 20  # no message drawn here comes near it: the size limit is tested on its own below


def encode(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = b"\x00" * 4,
           long_length: bool = False) -> bytes:  # fmt: skip
    """One client frame, exactly as asked (broken, if asked so)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    flag = 0x80 if mask is not None else 0
    if long_length:  # a length in more bytes than it needs
        head += bytes([flag | 126]) + struct.pack("!H", n) if n < 65536 else bytes([flag | 127]) + struct.pack("!Q", n)
    elif n < 126:
        head += bytes([flag | n])
    elif n < 65536:
        head += bytes([flag | 126]) + struct.pack("!H", n)
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


masks = st.binary(min_size=4, max_size=4)
texts = st.text(max_size=60).map(str.encode) | st.binary(max_size=40)  # UTF-8, or maybe not


@st.composite
def data_message(draw) -> list[tuple[bytes, bool]]:
    """A text or binary message in 1-4 fragments (each a frame; True marks a data frame)."""
    opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
    payload = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    frames = []
    for i, piece in enumerate(pieces):
        frames.append(
            (encode(opcode if i == 0 else OP_CONTINUATION, piece, fin=i == len(pieces) - 1, mask=draw(masks)), True)
        )
    return frames


@st.composite
def control_frame(draw) -> bytes:
    opcode = draw(st.sampled_from([OP_PING, OP_PONG, OP_CLOSE]))
    if opcode == OP_CLOSE:
        code = draw(st.sampled_from([1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1014, 1015, 2999, 3000,
                                     4999, 5000, 999, 0]))  # fmt: skip
        payload = draw(
            st.sampled_from([b"", b"x"]) | texts.map(lambda reason, code=code: struct.pack("!H", code) + reason[:100])
        )
    else:
        payload = draw(st.binary(max_size=125) | st.binary(min_size=126, max_size=130))
    return encode(opcode, payload, fin=draw(st.booleans() | st.just(True)), mask=draw(masks))


@st.composite
def broken_frame(draw) -> bytes:
    """A frame with random header bits: reserved bits and opcodes, no mask, a long length form."""
    return encode(
        draw(st.integers(0, 15)),
        draw(st.binary(max_size=30)),
        fin=draw(st.booleans()),
        rsv=draw(st.integers(0, 7)),
        mask=draw(st.none() | masks),
        long_length=draw(st.booleans()),
    )


@st.composite
def streams(draw) -> list[bytes]:
    """Frames: messages (control frames between their fragments), now and then a broken one."""
    frames: list[bytes] = []
    for _ in range(draw(st.integers(1, 8))):
        choice = draw(st.integers(0, 9))
        if choice < 6:
            for frame, _data in draw(data_message()):
                frames.append(frame)
                if draw(st.integers(0, 5)) == 0:
                    frames.append(draw(control_frame()))
        elif choice < 8:
            frames.append(draw(control_frame()))
        else:
            frames.append(draw(broken_frame()))
    return frames


def ours(chunks: list[bytes]) -> list[tuple]:
    parser, out = FrameParser(BIG), []
    for chunk in chunks:
        failed = None
        try:
            events = parser.feed(chunk)
        except WebSocketError as exc:
            events, failed = exc.events, exc
        for opcode, payload in events:
            if opcode == OP_CLOSE:
                return [*out, ("close", relay_mod.close_code(payload))]
            out.append({OP_TEXT: "text", OP_BINARY: "binary", OP_PING: "ping", OP_PONG: "pong"}[opcode])
            out.append(payload.decode() if opcode == OP_TEXT else payload)
        if failed is not None:
            return [*out, ("close", failed.code)]
    return out


def wsprotos(chunks: list[bytes]) -> list[tuple]:
    conn, out, text, binary = Connection(ConnectionType.SERVER), [], "", b""
    for chunk in chunks:
        conn.receive_data(chunk)
        for event in conn.events():
            if isinstance(event, CloseConnection):
                return [*out, ("close", event.code)]
            if isinstance(event, TextMessage):
                text += event.data
                if event.message_finished:
                    out += ["text", text]
                    text = ""
            elif isinstance(event, BytesMessage):
                binary += event.data
                if event.message_finished:
                    out += ["binary", binary]
                    binary = b""
            elif isinstance(event, Ping | Pong):
                out += ["ping" if isinstance(event, Ping) else "pong", bytes(event.payload)]
    return out


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=streams(), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_the_parser_agrees_with_wsproto(frames, cuts):
    data = b"".join(frames)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert ours(chunks) == wsprotos(chunks)


# -- the limits wsproto leaves to its user ------------------------------------------------------------


def test_a_message_over_the_size_limit_is_refused_from_its_header():
    parser = FrameParser(100)
    assert parser.feed(encode(OP_TEXT, b"x" * 100)) == [(OP_TEXT, b"x" * 100)]
    head = encode(OP_TEXT, b"x" * 101)[:8]  # header and mask only: the payload never needs to arrive
    with pytest.raises(WebSocketError) as exc:
        parser.feed(head)
    assert exc.value.code == 1009
    fragments = FrameParser(100)
    fragments.feed(encode(OP_TEXT, b"x" * 60, fin=False))
    with pytest.raises(WebSocketError) as exc:
        fragments.feed(encode(OP_CONTINUATION, b"x" * 41)[:8])
    assert exc.value.code == 1009


def test_an_endless_run_of_empty_continuations_is_cut_off():
    parser = FrameParser(BIG)
    parser.feed(encode(OP_TEXT, b"", fin=False))
    with pytest.raises(WebSocketError) as exc:
        for _ in range(relay_mod.MAX_FRAGMENTS + 1):
            parser.feed(encode(OP_CONTINUATION, b"", fin=False))
    assert exc.value.code == 1009
    whole = FrameParser(BIG)  # as many fragments as allowed make a message
    frames = [encode(OP_TEXT, b"a", fin=False)]
    frames += [encode(OP_CONTINUATION, b"b", fin=False)] * (relay_mod.MAX_FRAGMENTS - 2)
    frames.append(encode(OP_CONTINUATION, b"c"))
    assert whole.feed(b"".join(frames)) == [(OP_TEXT, b"a" + b"b" * (relay_mod.MAX_FRAGMENTS - 2) + b"c")]


def test_what_an_incomplete_frame_holds_is_bounded_by_its_header():
    parser = FrameParser(1000)
    frame = encode(OP_BINARY, bytes(range(256)) * 3)
    events = []
    for i in range(len(frame)):  # a byte at a time
        events += parser.feed(frame[i : i + 1])
        assert len(parser._buffer) <= 14 + 1000
    assert events == [(OP_BINARY, bytes(range(256)) * 3)]
