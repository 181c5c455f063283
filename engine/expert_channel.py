"""The socket between the switcher and an expert's actor: hand-overs and aborts go one way, each engine step's
tokens come back the other, as length-prefixed pickles over one TCP connection.

Why not a Ray call per step: on a 2-core machine a Ray actor call per decode step cost ~6.5 % of a 27 ms step
and delivered a step's tokens 1.1 ms (median; p90 2.9 ms) after they existed, where a socket write from the
engine's own thread cost ~1.7 % and delivered them in 0.19 ms (bench/RESULTS.md, issue 13). Ray still places
the actor, loads it, reports its counts and tells a dead actor from a slow one; only the per-step traffic uses
this channel.

The actor listens on its node's address on a port of the kernel's choosing, accepts one connection, and
takes it only if its first bytes are the secret it handed out through Ray; nothing is unpickled before. The
secret travels as Ray's own traffic does (encrypted only where Ray's TLS is on), and the connection is not
encrypted: run experts on a network you trust, as Ray itself requires.
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
HANDSHAKE_S = 2.0  # a connection must show the secret this soon


class ChannelClosed(ConnectionError):
    """The other side closed the connection (or it broke)."""


class Channel:
    """One connected socket: ``send`` from any thread, ``receive`` from one thread."""

    def __init__(self, sock: socket.socket, send_timeout: float | None = None):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame is one step: never wait to batch
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # Reads wait in poll(); a timeout bounds only a send to a peer that stopped reading (a partition).
        sock.settimeout(send_timeout)
        self.sock = sock
        self.poller = select.poll()  # not select(): a server may hold more than 1,024 descriptors
        self.poller.register(sock, select.POLLIN)
        self.send_lock = threading.Lock()
        self.buffer = bytearray()
        self.closed: str | None = None  # why, once closed

    def send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            try:
                self.sock.sendall(_HEADER.pack(len(data)) + data)
            except OSError as e:  # part of a frame may be out: the stream is unusable, and the peer must know
                self.closed = self.closed or f"send failed: {e or type(e).__name__}"
                self._shut()
                raise ChannelClosed(self.closed) from None

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
        try:
            return bool(self.poller.poll(timeout * 1000))
        except (OSError, ValueError) as e:  # closed under us (at interpreter exit)
            self.closed = f"the connection is gone: {e}"
            raise ChannelClosed(self.closed) from None

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
                self.closed = f"a frame of {size} bytes: the stream is corrupt"
                self.buffer.clear()
                break
            if len(self.buffer) < _HEADER.size + size:
                break
            try:
                frames.append(pickle.loads(self.buffer[_HEADER.size:_HEADER.size + size]))
            except Exception as e:  # noqa: BLE001 (e.g. another etr version on the other side)
                self.closed = f"an undecodable frame ({type(e).__name__}: {e})"  # its owner says so and closes
                self.buffer.clear()
                break
            del self.buffer[:_HEADER.size + size]
        return frames

    def close(self) -> None:
        self.closed = self.closed or "closed on this side"
        self._shut()
        self.sock.close()

    def _shut(self) -> None:
        """Tell the peer (it reads an end of stream) without closing the descriptor another thread may poll."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Listener:
    """The actor's end before the switcher connects: a port on ``host`` and the secret to show."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.secret = secrets.token_bytes(32)

    def accept(self, timeout: float, send_timeout: float | None = None) -> Channel:
        """The first connection that shows the secret within ``timeout`` seconds; others are closed (each has
        ``HANDSHAKE_S`` to show it, so a silent one does not hold the door)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    conn, _ = self.sock.accept()
                except socket.timeout:
                    raise ChannelClosed(f"no switcher connected within {timeout:g} s") from None
                channel = Channel(conn, send_timeout=min(HANDSHAKE_S, max(deadline - time.monotonic(), 0.001)))
                try:
                    shown = channel.receive_raw(len(self.secret))
                except (ChannelClosed, OSError):
                    shown = b""
                if hmac.compare_digest(shown, self.secret):
                    conn.settimeout(send_timeout)
                    return channel
                channel.close()
        finally:
            self.sock.close()


def connect(host: str, port: int, secret: bytes, timeout: float, send_timeout: float | None = None) -> Channel:
    """The switcher's end: connect and show the secret; a send blocked longer than ``send_timeout`` (a peer that
    stopped reading) fails."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ChannelClosed(f"cannot connect to {host}:{port}: {e}") from None
    channel = Channel(sock, send_timeout)
    with channel.send_lock:
        sock.sendall(secret)
    return channel
