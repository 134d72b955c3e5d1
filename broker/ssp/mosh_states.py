"""mosh's two state types, so our core can talk to a real mosh-server.

ssp-mosh.md sections 9.2 to 9.4. ``UserStream`` is the client's state (the
keystrokes and window sizes typed so far), ``HostState`` what a client needs
of the server's terminal state: the screen-update bytes (feed them to a VT
emulator such as pyte), the window size and ``echo_ack``. Diffs are mosh's
protobufs ``ClientBuffers.UserMessage`` and ``HostBuffers.HostMessage``,
byte for byte.
"""

from typing import NamedTuple

from google.protobuf.message import DecodeError

from broker.ssp import hostinput_pb2, userinput_pb2
from broker.ssp.state import EMPTY_DIFF, EventQueue, bad_diff

#: Terminal size mosh-server starts with when its stdin is not a tty
#: (``run_server`` in src/frontend/mosh-server.cc).
DEFAULT_WIDTH = 80
DEFAULT_HEIGHT = 24


class Resize(NamedTuple):
    """A window size change, one UserStream event."""

    width: int
    height: int


def _parse(message_type, diff: bytes):
    try:
        return message_type.FromString(bytes(diff))
    except (DecodeError, ValueError, TypeError) as error:
        raise bad_diff(f"not a {message_type.__name__}: {error}") from None


class UserStream(EventQueue):
    """Immutable queue of user events: byte values (0..255) and Resizes.

    Events carry absolute positions (``event_base`` is the position of the
    first one held) so that ``subtract`` can forget acknowledged input.
    """

    __slots__ = ("_events", "_event_base")
    __hash__ = None

    def __init__(self, events=(), event_base=0):
        """Build from events: ints 0..255 (one byte each) or Resize."""
        for event in events:
            if not (type(event) is Resize or type(event) is int
                    and 0 <= event <= 255):
                raise TypeError(f"not a user event: {event!r}")
        self._events = tuple(events)
        self._event_base = event_base

    @classmethod
    def _make(cls, events, event_base):
        stream = object.__new__(cls)
        stream._events = events
        stream._event_base = event_base
        return stream

    @classmethod
    def empty(cls):
        """State 0: nothing typed (a shared singleton)."""
        return _EMPTY_STREAM

    def with_keys(self, data: bytes) -> "UserStream":
        """This stream with the bytes ``data`` typed."""
        if not data:
            return self
        return UserStream._make(self._events + tuple(bytes(data)),
                                self._event_base)

    def with_resize(self, width: int, height: int) -> "UserStream":
        """This stream with a window size change."""
        return UserStream._make(self._events + (Resize(width, height),),
                                self._event_base)

    def subtract(self, prefix: "UserStream") -> "UserStream":
        """This stream without the events ``prefix`` holds (acknowledged)."""
        cut = min(prefix.event_end, self.event_end)
        if cut <= self._event_base:
            return self
        return UserStream._make(self._events[cut - self._event_base:], cut)

    def diff_from(self, existing: "UserStream") -> bytes:
        """A UserMessage with the events after ``existing`` (a prefix)."""
        start = existing.event_end
        if not self._event_base <= start <= self.event_end:
            raise ValueError(f"not a prefix: it ends at {start}, this stream "
                             f"holds {self._event_base}..{self.event_end}")
        message = userinput_pb2.UserMessage()
        run = bytearray()
        for event in self._events[start - self._event_base:]:
            if type(event) is int:
                run.append(event)
                continue
            if run:
                self._add_keys(message, run)
                run = bytearray()
            resize = message.instruction.add().Extensions[userinput_pb2.resize]
            resize.width, resize.height = event
        if run:
            self._add_keys(message, run)
        if not message.instruction:
            return EMPTY_DIFF
        return message.SerializeToString()

    @staticmethod
    def _add_keys(message, run):
        """Consecutive bytes travel as one Keystroke (as mosh joins them)."""
        instruction = message.instruction.add()
        instruction.Extensions[userinput_pb2.keystroke].keys = bytes(run)

    def apply(self, diff: bytes) -> "UserStream":
        """This stream with the UserMessage ``diff`` appended."""
        if not diff:
            return self
        added = []
        for instruction in _parse(userinput_pb2.UserMessage, diff).instruction:
            if instruction.HasExtension(userinput_pb2.keystroke):
                keys = instruction.Extensions[userinput_pb2.keystroke].keys
                added.extend(keys)
            elif instruction.HasExtension(userinput_pb2.resize):
                resize = instruction.Extensions[userinput_pb2.resize]
                added.append(Resize(resize.width, resize.height))
            # Other instructions are ignored, as mosh-server does.
        if not added:
            return self
        return UserStream._make(self._events + tuple(added), self._event_base)

    def __eq__(self, other):
        if not isinstance(other, UserStream):
            return NotImplemented
        return (self._event_base == other._event_base
                and self._events == other._events)

    def __repr__(self):
        return (f"UserStream({list(self._events)!r}, "
                f"event_base={self._event_base})")


class HostState:
    """What a client keeps of mosh-server's terminal state.

    ``host_bytes`` are all screen-update bytes since state 0, in order; they
    are a repaint stream, not the pty's output (ssp-mosh.md section 11.7).
    ``subtract`` is a no-op, as for mosh's ``Terminal::Complete``.
    """

    __slots__ = ("_host_bytes", "_width", "_height", "_echo_ack")
    __hash__ = None

    def __init__(self, host_bytes=b"", width=DEFAULT_WIDTH,
                 height=DEFAULT_HEIGHT, echo_ack=0):
        self._host_bytes = bytes(host_bytes)
        self._width = width
        self._height = height
        self._echo_ack = echo_ack

    @classmethod
    def empty(cls):
        """State 0: a blank 80x24 terminal, echo_ack 0 (a shared singleton)."""
        return _EMPTY_HOST

    @property
    def host_bytes(self) -> bytes:
        """Every HostBytes string received since state 0, joined."""
        return self._host_bytes

    @property
    def size(self) -> tuple:
        """The terminal's (width, height)."""
        return self._width, self._height

    @property
    def echo_ack(self) -> int:
        """Newest client state number the server reports as echoed."""
        return self._echo_ack

    def subtract(self, prefix: "HostState") -> "HostState":
        """Nothing to forget (mosh's Complete::subtract is a no-op)."""
        return self

    def diff_from(self, existing: "HostState") -> bytes:
        """A HostMessage: EchoAck, Resize, then the new HostBytes (mosh's
        order)."""
        old = existing._host_bytes
        if not self._host_bytes.startswith(old):
            raise ValueError("existing host bytes are not a prefix of ours")
        message = hostinput_pb2.HostMessage()
        if self._echo_ack != existing._echo_ack:
            echo = message.instruction.add().Extensions[hostinput_pb2.echoack]
            echo.echo_ack_num = self._echo_ack
        if self.size != existing.size:
            resize = message.instruction.add().Extensions[hostinput_pb2.resize]
            resize.width, resize.height = self.size
        if len(self._host_bytes) > len(old):
            instruction = message.instruction.add()
            instruction.Extensions[hostinput_pb2.hostbytes].hoststring = (
                self._host_bytes[len(old):])
        if not message.instruction:
            return EMPTY_DIFF
        return message.SerializeToString()

    def apply(self, diff: bytes) -> "HostState":
        """The state after the HostMessage ``diff``."""
        if not diff:
            return self
        chunks = [self._host_bytes]
        width, height, echo_ack = self._width, self._height, self._echo_ack
        for instruction in _parse(hostinput_pb2.HostMessage, diff).instruction:
            if instruction.HasExtension(hostinput_pb2.hostbytes):
                chunks.append(
                    instruction.Extensions[hostinput_pb2.hostbytes].hoststring)
            elif instruction.HasExtension(hostinput_pb2.resize):
                resize = instruction.Extensions[hostinput_pb2.resize]
                width, height = resize.width, resize.height
            elif instruction.HasExtension(hostinput_pb2.echoack):
                echo = instruction.Extensions[hostinput_pb2.echoack]
                echo_ack = echo.echo_ack_num
            # Other instructions are ignored, as mosh-client does.
        state = object.__new__(HostState)
        state._host_bytes = b"".join(chunks)
        state._width, state._height, state._echo_ack = width, height, echo_ack
        return state

    def __eq__(self, other):
        if not isinstance(other, HostState):
            return NotImplemented
        return (self._echo_ack == other._echo_ack and self.size == other.size
                and self._host_bytes == other._host_bytes)

    def __repr__(self):
        return (f"HostState({len(self._host_bytes)} bytes, "
                f"size={self._width}x{self._height}, "
                f"echo_ack={self._echo_ack})")


_EMPTY_STREAM = UserStream._make((), 0)
_EMPTY_HOST = HostState()
