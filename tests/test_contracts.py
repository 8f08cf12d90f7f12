"""What the relay needs of the libraries under it, one test per assumption, so that an upgrade that
breaks one fails here, by name, rather than as a hang or a lost message somewhere else.

The relay's I/O core uses trio's low-level API on bare socket descriptors (pyproject.toml pins the
trio versions this was verified with) and websockets' C ``apply_mask`` to unmask client frames. The
server does not use trio-websocket at all any more (it has its own frame layer): trio-websocket is
only the client of the tests and the bench, so nothing here depends on its internals.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import relay


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


async def test_trio_waits_on_a_bare_descriptor(pair):
    """_Transport and the accept loop keep ints, not socket objects: wait_readable and wait_writable
    take a file descriptor."""
    a, b = pair
    with trio.fail_after(5):
        await trio.lowlevel.wait_writable(a.fileno())
        b.send(b"x")
        await trio.lowlevel.wait_readable(a.fileno())
        assert os.read(a.fileno(), 10) == b"x"


@pytest.mark.parametrize("wait", [trio.lowlevel.wait_readable, trio.lowlevel.wait_writable])
async def test_notify_closing_wakes_a_waiter_with_closed_resource_error(pair, wait):
    """_Transport.interrupt: notify_closing is how the relay stops a read loop (or a flusher) from
    outside, instead of a cancel scope per connection; the woken task sees ClosedResourceError."""
    a, _ = pair
    fd = a.fileno()
    if wait is trio.lowlevel.wait_writable:  # fill the buffer, so that waiting for writable waits
        try:
            while True:
                a.send(b"x" * 65536)
        except BlockingIOError:
            pass
    woken: list[type[BaseException]] = []

    async def waiter() -> None:
        try:
            await wait(fd)
        except trio.ClosedResourceError as error:
            woken.append(type(error))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.notify_closing(fd)
    assert woken == [trio.ClosedResourceError]


async def test_the_descriptor_is_usable_after_notify_closing(pair):
    """After an interrupt the relay still sends its last messages and close frame on the same socket,
    and waits on it again: notify_closing only forgets the waiters, it neither closes the descriptor
    nor keeps later waits from working."""
    a, b = pair
    fd = a.fileno()
    trio.lowlevel.notify_closing(fd)
    a.send(b"still open")
    assert b.recv(100) == b"still open"
    with trio.fail_after(5):
        b.send(b"y")
        await trio.lowlevel.wait_readable(fd)
        assert os.read(fd, 10) == b"y"
        await trio.lowlevel.wait_writable(fd)


async def test_notify_closing_without_waiters_is_harmless(pair):
    """Relay.close_client interrupts a client whose task may be busy, not waiting: nothing must happen."""
    a, _ = pair
    trio.lowlevel.notify_closing(a.fileno())
    trio.lowlevel.notify_closing(a.fileno())


def test_websockets_has_its_c_apply_mask():
    """Unmasking in pure Python would cost the relay most of its throughput: the C speedup must be
    there (the fallback in relay.py is for platforms without a wheel, not for this one)."""
    from websockets.speedups import apply_mask

    assert relay._apply_mask is apply_mask


@given(data=st.binary(max_size=300), mask=st.binary(min_size=4, max_size=4))
def test_apply_mask_is_xor_with_the_repeated_mask(data: bytes, mask: bytes):
    """RFC 6455 5.3, on bytes as the frame parser passes them."""
    expected = bytes(byte ^ mask[i % 4] for i, byte in enumerate(data))
    assert relay._apply_mask(data, mask) == expected
