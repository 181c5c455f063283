"""The socket between the switcher and an expert's actor: hand-overs and aborts go one way, each engine step's
tokens come back the other, as length-prefixed pickles over one TCP connection.

Why not a Ray call per step: on a 2-core machine a Ray actor call per decode step cost ~6.5 % of a 27 ms step
and delivered a step's tokens 1.1 ms (median; p90 2.9 ms) after they existed, where a socket write from the
engine's own thread cost ~1.7 % and delivered them in 0.19 ms (bench/RESULTS.md, issue 13). Ray still places
the actor, loads it, reports its counts and tells a dead actor from a slow one; only the per-step traffic uses
this channel.

The actor listens on its node's address on a port of the kernel's choosing, accepts one connection, and
takes it only if its first bytes are the secret it handed out through Ray (nothing is unpickled before: nothing
else on the network can send it pickles).
"""

from __future__ import annotations

import hmac
import pickle
import secrets
import select
import socket
import struct
import threading
import time

_HEADER = struct.Struct("<I")  # the pickle's length in bytes
MAX_FRAME = 1 << 30


class ChannelClosed(ConnectionError):
    """The other side closed the connection (or it broke)."""


class Channel:
    """One connected socket: ``send`` from any thread, ``receive`` from one thread."""

    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame is one step: never wait to batch
        sock.setblocking(True)
        self.sock = sock
        self.send_lock = threading.Lock()
        self.buffer = bytearray()
        self.closed: str | None = None  # why, once closed

    def send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            try:
                self.sock.sendall(_HEADER.pack(len(data)) + data)
            except OSError as e:
                raise ChannelClosed(f"send failed: {e}") from None

    def receive(self, timeout: float) -> list:
        """Every frame that has arrived, waiting up to ``timeout`` seconds for the first (0: none waited for).
        Raises ``ChannelClosed`` once the other side is gone and every frame before is read."""
        frames = self._frames()
        deadline = time.monotonic() + timeout
        try:
            while not frames:
                left = deadline - time.monotonic()
                if not self._readable(max(left, 0.0)):
                    return []
                self._read()
                frames = self._frames()
                if left <= 0:
                    break
            while self._readable(0.0):  # and whatever else is already here
                self._read()
                frames += self._frames()
        except ChannelClosed:
            frames += self._frames()
            if not frames:  # what came before the close is delivered first; the next call raises
                raise
        return frames

    def receive_raw(self, size: int) -> bytes:
        """Exactly ``size`` bytes, not unpickled (the secret: nothing from an unknown peer is unpickled)."""
        while len(self.buffer) < size:
            self._read()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _readable(self, timeout: float) -> bool:
        if self.closed:
            raise ChannelClosed(self.closed)
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def _read(self) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except OSError as e:
            self.closed = f"receive failed: {e}"
            raise ChannelClosed(self.closed) from None
        if not chunk:
            self.closed = "the other side closed the connection"
            raise ChannelClosed(self.closed)
        self.buffer += chunk

    def _frames(self) -> list:
        frames = []
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if size > MAX_FRAME:
                raise ChannelClosed(f"a frame of {size} bytes: the stream is corrupt")
            if len(self.buffer) < _HEADER.size + size:
                break
            frames.append(pickle.loads(self.buffer[_HEADER.size:_HEADER.size + size]))
            del self.buffer[:_HEADER.size + size]
        return frames

    def close(self) -> None:
        self.closed = self.closed or "closed on this side"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Listener:
    """The actor's end before the switcher connects: a port on ``host`` and the secret to show."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.secret = secrets.token_bytes(32)

    def accept(self, timeout: float) -> Channel:
        """The first connection that shows the secret within ``timeout`` seconds; others are closed."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    conn, _ = self.sock.accept()
                except socket.timeout:
                    raise ChannelClosed(f"no switcher connected within {timeout:g} s") from None
                channel = Channel(conn)
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    shown = channel.receive_raw(len(self.secret))
                except (ChannelClosed, OSError):
                    shown = b""
                if hmac.compare_digest(shown, self.secret):
                    conn.settimeout(None)
                    return channel
                channel.close()
        finally:
            self.sock.close()


def connect(host: str, port: int, secret: bytes, timeout: float) -> Channel:
    """The switcher's end: connect and show the secret."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ChannelClosed(f"cannot connect to {host}:{port}: {e}") from None
    channel = Channel(sock)
    with channel.send_lock:
        sock.sendall(secret)
    return channel
