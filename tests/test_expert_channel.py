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
    with pytest.raises(ChannelClosed, match="closed the connection"):  # the reason it closed, for a send too
        for _ in range(100):
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


# ---- the switcher's side (engine/remote_expert.py) against a scripted actor end, no Ray ----------------------

from types import SimpleNamespace  # noqa: E402
from etr.engine.expert_worker import Progress  # noqa: E402
from etr.engine.remote_expert import RemoteExpertEngine  # noqa: E402
from etr.engine.sampling_params import SamplingParams  # noqa: E402
from etr.engine.sequence import Sequence  # noqa: E402
from etr.errors import ExpertUnavailableError  # noqa: E402

INFO = {"vocab_size": 100, "hidden_size": 8, "block_size": 16, "num_kv_blocks": 64, "max_model_len": 256,
        "vocab_fingerprint": None, "device": "cpu"}
COUNTS = {"kv_blocks_used": 1, "num_running": 1, "num_waiting": 0}


def scripted(ray_timeout_s: float = 120.0):
    """A RemoteExpertEngine whose channel's other end (returned) the test plays the actor with."""
    switcher_end, actor_end = pair()
    engine = RemoteExpertEngine.__new__(RemoteExpertEngine)
    engine.config, engine.name, engine.model_dir = SimpleNamespace(ray_timeout_s=ray_timeout_s), "law", "/law"
    engine._init_state(INFO, switcher_end)
    engine._release = switcher_end.close
    return engine, actor_end


def held(engine, n: int = 2) -> list[Sequence]:
    seqs = [Sequence([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8), 16, "cpu") for _ in range(n)]
    for seq in seqs:
        engine.adopt(seq)
    return seqs


def step(engine, wait: bool = False) -> list[Sequence]:
    pending = engine.launch(wait=wait)
    return [] if pending is None else engine.finish(pending)


def test_tokens_arrive_and_the_hand_off_is_timed():
    engine, actor = scripted()
    a, b = held(engine)
    assert step(engine) == [] and engine.has_unfinished()
    (handovers, aborts), = actor.receive(5.0)
    assert [h.seq_id for h in handovers] == [a.seq_id, b.seq_id] and aborts == []
    actor.send({"progress": [Progress(a.seq_id, [7], held_s=0.0), Progress(b.seq_id, [8, 9], True, "length",
                                                                            held_s=0.0)], **COUNTS})
    got = step(engine, wait=True)
    assert {s.seq_id for s in got} == {a.seq_id, b.seq_id}
    assert a.output_token_ids == [7] and b.output_token_ids == [8, 9] and b.finish_reason == "length"
    assert a.switch_network_s is not None and a.switch_network_s >= 0
    assert engine.kv_blocks_used() == 1 and list(engine.seqs) == [a.seq_id]


def test_a_closed_connection_fails_the_held_requests_by_name():
    engine, actor = scripted()
    a, b = held(engine)
    step(engine)
    actor.close()
    got = step(engine, wait=True)
    assert {s.seq_id for s in got} == {a.seq_id, b.seq_id}
    assert all(s.finish_reason == "error" and isinstance(s.error, ExpertUnavailableError) for s in got)
    assert "expert 'law'" in str(a.error) and "died" in str(a.error) and "closed the connection" in str(a.error)
    assert not engine.has_unfinished()
    late = Sequence([1], SamplingParams(max_tokens=2), 16, "cpu")
    engine.adopt(late)  # a later hand-over fails at once
    assert late.finish_reason == "error" and not engine.has_unfinished()


def test_a_failed_send_still_returns_the_failed_requests():
    engine, actor = scripted()
    a, b = held(engine)
    step(engine)
    engine.channel.sock.shutdown(socket.SHUT_WR)  # the next send breaks
    engine.abort([a])
    assert engine.dead is not None and engine.has_unfinished()  # b must still reach its caller
    got = step(engine)
    assert [s.seq_id for s in got] == [b.seq_id] and b.finish_reason == "error" and a.finish_reason == "abort"
    assert not engine.has_unfinished()
    actor.close()


def test_an_undecodable_frame_fails_only_this_expert():
    engine, actor = scripted()
    (a,) = held(engine, 1)
    step(engine)
    actor.sock.sendall((5).to_bytes(4, "little") + b"\x80\x05junk")
    got = step(engine, wait=True)
    assert got == [a] and "undecodable frame" in str(a.error)


def test_silence_counts_only_while_requests_are_held():
    engine, actor = scripted(ray_timeout_s=1.0)
    engine.last_heard -= 1000  # idle for a long time: says nothing about the actor
    (a,) = held(engine, 1)
    assert step(engine) == [] and engine.dead is None
    engine.last_heard -= 10  # then silent while holding a request: longer than ray_timeout_s
    got = step(engine)
    assert got == [a] and "no word from it" in str(a.error)
    actor.close()


def test_only_the_changed_text_crosses_and_the_mirror_rebuilds_it():
    from etr.engine.expert_worker import ExpertWorker
    worker = SimpleNamespace(texts={1: "Hello wor", 2: "ab\ufffd"})
    grown, rewritten = Progress(1, [5], text="Hello world"), Progress(2, [6], True, "stop", text="ab\u00e9!")
    ExpertWorker._text_change(worker, grown)
    ExpertWorker._text_change(worker, rewritten)  # a partial character completed: the last one changes
    assert (grown.text, grown.text_from) == ("ld", 9) and (rewritten.text, rewritten.text_from) == ("\u00e9!", 2)
    assert worker.texts == {1: "Hello world"}  # a finished sequence's text is forgotten
    engine, actor = scripted()
    (a,) = held(engine, 1)
    a.text = "ab\ufffd"
    step(engine)
    actor.send({"progress": [Progress(a.seq_id, [6], text="\u00e9!", text_from=2)], **COUNTS})
    step(engine, wait=True)
    assert a.text == "ab\u00e9!"
    actor.close()
