"""The remote expert's socket (engine/expert_channel.py) on the loopback: frames arrive whole, in order and all
at once when several are waiting; a close is reported after the frames sent before it; a peer without the
secret is refused before anything it sent is unpickled; an accept with nobody connecting ends in time."""

from __future__ import annotations

import pickle
import socket
import threading
import time

import pytest

from etr.engine.expert_channel import Channel, ChannelClosed, Listener, connect


def pair() -> tuple[Channel, Channel]:
    listener = Listener("127.0.0.1")
    accepted: list = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept(10.0)))
    thread.start()
    client = connect(listener.host, listener.port, listener.secret, 10.0)
    thread.join(10)
    return client, accepted[0]


def test_frames_arrive_whole_in_order_and_together():
    client, server = pair()
    assert server.receive(0.0) == []  # nothing waited for, nothing there
    big = list(range(300_000))  # larger than one recv: assembled from several reads
    for i in range(5):
        client.send(("frame", i, big if i == 2 else None))
    frames = []
    deadline = time.monotonic() + 10
    while len(frames) < 5 and time.monotonic() < deadline:
        frames += server.receive(1.0)
    assert [f[1] for f in frames] == [0, 1, 2, 3, 4] and frames[2][2] == big
    client.close()
    server.close()


def test_receive_waits_for_the_first_frame_only_up_to_its_timeout():
    client, server = pair()
    start = time.monotonic()
    assert server.receive(0.2) == []
    assert 0.15 < time.monotonic() - start < 2.0
    threading.Timer(0.1, lambda: client.send({"late": True})).start()
    assert server.receive(5.0) == [{"late": True}]
    client.close()
    server.close()


def test_a_close_comes_after_the_frames_sent_before_it():
    client, server = pair()
    client.send("last words")
    client.close()
    time.sleep(0.1)
    assert server.receive(1.0) == ["last words"]
    with pytest.raises(ChannelClosed, match="closed the connection"):
        server.receive(1.0)
    with pytest.raises(ChannelClosed):
        server.receive(0.0)  # and stays closed
    with pytest.raises(ChannelClosed, match="send failed"):
        for _ in range(100):  # the peer is gone: a send fails (at the latest once the kernel knows)
            server.send("anyone?")
            time.sleep(0.01)


class Boom:
    def __reduce__(self):  # unpickling this would run code
        return (exec, ("raise SystemExit('unpickled a stranger')",))


def test_a_peer_without_the_secret_is_refused_before_anything_is_unpickled():
    listener = Listener("127.0.0.1")
    accepted: list = []

    def accept():
        try:
            accepted.append(listener.accept(1.0))
        except ChannelClosed as e:
            accepted.append(e)
    thread = threading.Thread(target=accept)
    thread.start()
    stranger = socket.create_connection((listener.host, listener.port))
    payload = pickle.dumps(Boom())
    stranger.sendall(len(payload).to_bytes(4, "little") + payload + b"\0" * 64)  # no secret: a pickle instead
    thread.join(10)
    assert isinstance(accepted[0], ChannelClosed) and "within 1 s" in str(accepted[0])
    assert stranger.recv(1) == b""  # it was hung up on
    stranger.close()


def test_accept_with_nobody_connecting_ends_in_time():
    listener = Listener("127.0.0.1")
    start = time.monotonic()
    with pytest.raises(ChannelClosed, match="no switcher connected within 0.3 s"):
        listener.accept(0.3)
    assert time.monotonic() - start < 3.0
    with pytest.raises(ChannelClosed, match="cannot connect"):
        connect(listener.host, listener.port, listener.secret, 1.0)  # the port is closed after
