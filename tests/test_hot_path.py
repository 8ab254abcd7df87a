"""The realtime input path's CPU optimisations (issue 14) change nothing a client can see: the append fast
path accepts exactly what the general parser accepts, with the same result, and hands everything else to
it; the per-session idle timer closes a session that went quiet, as the per-event timeout did; the VAD's
rounds over the streams pushed to give the same events, in the same order, as rounds over every stream."""

from __future__ import annotations

import asyncio
import base64
import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.vad import SileroModel, VadBank, VadParams
from server.realtime import RealtimeConnection, _Closing
from server.wire.client_events import AudioAppend, parse_audio_append, parse_client_event
from server.wire.errors import ProtocolError
from tests.speech import compose

APPEND = "input_audio_buffer.append"
AUDIO = base64.b64encode(bytes(range(256)) * 4).decode()


def _reference(text: str | bytes) -> AudioAppend | ProtocolError:
    try:
        event = parse_client_event(text)
    except ProtocolError as exc:
        return exc
    assert isinstance(event, AudioAppend) or event.type != APPEND
    return event


def _same_as_the_general_parser(text: str | bytes) -> AudioAppend | None:
    fast = parse_audio_append(text)
    if fast is not None:
        reference = _reference(text)
        assert isinstance(reference, AudioAppend), f"fast path took what the parser refuses: {text[:200]!r}"
        assert fast.model_dump() == reference.model_dump()
        assert fast.model_fields_set == reference.model_fields_set
    return fast


@pytest.mark.parametrize("extra", [{}, {"event_id": "evt_1"}, {"event_id": None}])
def test_a_plain_append_takes_the_fast_path(extra: dict[str, Any]) -> None:
    for text in (json.dumps({"type": APPEND, "audio": AUDIO, **extra}),
                 json.dumps({**extra, "audio": AUDIO, "type": APPEND}, separators=(",", ":"))):
        event = _same_as_the_general_parser(text)
        assert event is not None and event.audio == AUDIO and event.event_id == extra.get("event_id")
        assert _same_as_the_general_parser(text.encode()) is not None


@pytest.mark.parametrize("text", [
    '{"type": "input_audio_buffer.append", "audio": "AAAA", "extra": 1}',  # other fields: the parser ignores them
    '{"type": "input_audio_buffer.append", "audio": 5}',
    '{"type": "input_audio_buffer.append", "audio": null}',
    '{"type": "input_audio_buffer.append"}',
    '{"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": 7}',
    '{"type": "input_audio_buffer.append", "audio": "\\ud800"}',  # a lone surrogate: the parser's INVALID_JSON
    '{"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "\\udfff"}',
    '{"type": "input_audio_buffer.append", "audio": "\u00e9"}',  # non-ASCII: left to the parser
    '{"type": "input_audio_buffer.append", "audio": "AAAA", "audio": NaN}',
    '{"type": "input_audio_buffer.append", "audio": "AAAA"',
    '["input_audio_buffer.append"]',
    '{"type": "input_audio_buffer.commit", "note": "input_audio_buffer.append"}',
    '{"type": "transcription_session.update", "audio": "input_audio_buffer.append"}',
    '\ufeff{"type": "input_audio_buffer.append", "audio": "AAAA"}',
])
def test_anything_else_goes_to_the_general_parser(text: str) -> None:
    assert _same_as_the_general_parser(text) is None


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=500, deadline=None)
@given(
    type_=st.sampled_from([APPEND, APPEND + " ", "input_audio_buffer.commit", "session.update"]) | st.text(max_size=30),
    audio=st.sampled_from([AUDIO, "", "AAAA", "AA==", "%%%"]) | st.text(max_size=20) | _json_values,
    event_id=st.none() | st.text(max_size=10) | _json_values,
    extra=st.dictionaries(st.sampled_from(["event_id", "x", "audio", "type"]), _json_values, max_size=2),
    keys=st.sets(st.sampled_from(["type", "audio", "event_id"])),
)
def test_the_fast_path_agrees_with_the_general_parser(type_: Any, audio: Any, event_id: Any,
                                                      extra: dict[str, Any], keys: set[str]) -> None:
    fields = {"type": type_, "audio": audio, "event_id": event_id}
    data = {**{k: v for k, v in fields.items() if k in keys}, **extra}
    _same_as_the_general_parser(json.dumps(data))
    _same_as_the_general_parser(json.dumps(data, ensure_ascii=False))


async def test_the_idle_timer_closes_a_quiet_session_and_not_a_busy_one() -> None:
    loop = asyncio.get_running_loop()
    connection = SimpleNamespace(state=SimpleNamespace(settings=SimpleNamespace(idle_timeout_s=0.3)),
                                 _last_input=0.0)

    async def events_for(seconds: float) -> None:  # a client sending every 50 ms, as _read records it
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.sleep(0.05)
            connection._last_input = loop.time()

    start = loop.time()
    watch = asyncio.ensure_future(RealtimeConnection._watch_idle(connection))  # type: ignore[arg-type]
    await events_for(0.8)
    assert not watch.done()  # events kept coming for longer than the idle timeout
    with pytest.raises(_Closing) as closed:
        await watch
    quiet = loop.time() - connection._last_input
    assert 0.29 <= quiet < 0.6 and loop.time() - start >= 1.09
    assert (closed.value.code, closed.value.reason) == (1000, "idle for 0 s")


def test_vad_rounds_over_pushed_streams_give_every_event_in_the_same_order() -> None:
    speech, _ = compose([("silence", 0.4), ("speech", "What is the weather like in Paris today?"), ("silence", 1.0),
                         ("speech", "And tomorrow?"), ("silence", 0.8)])
    model = SileroModel()
    rng = np.random.default_rng(14)
    plan = []  # (stream, samples) pushes, with some streams idle for a while, one removed, one re-attached
    offsets = {sid: int(rng.integers(0, speech.size)) for sid in range(12)}
    for step in range(300):
        for sid in rng.permutation(12)[: int(rng.integers(1, 12))]:
            n = int(rng.choice([320, 480, 1000, 7, 2048]))
            start = (offsets[sid] + step * 997) % (speech.size - n)
            plan.append((int(sid), speech[start : start + n]))
        plan.append(("process", None))
    runs = []
    for scan_all in (True, False):
        bank = VadBank(model, max_batch=5, scan_all=scan_all)
        for sid in range(12):
            bank.add_stream(sid, VadParams(silence_duration_ms=200 + 50 * sid))
        got, detached = [], None
        for i, (sid, samples) in enumerate(plan):
            if i == len(plan) // 3:
                bank.remove_stream(3)
            if i == len(plan) // 2:
                detached = bank.detach(5)
            if i == 2 * len(plan) // 3 and detached is not None:
                bank.attach(5, detached)
            if sid == "process":
                got += [(s, type(e).__name__, e.start_sample) for s, e in bank.process()]
            elif sid in bank:
                bank.push(sid, samples)
        runs.append(got)
    assert len(runs[0]) > 50 and runs[0] == runs[1]


# --- appends taken in the transport's callback (switch "direct") keep the order of events ------------------


@pytest.mark.vllm
async def test_appends_taken_directly_keep_their_place_among_other_events(server_url: str) -> None:
    """A burst mixing appends with other events gets its answers in the order sent: appends are taken in the
    WebSocket's callback only while nothing is queued before them. Bad appends answer with an error carrying
    their event id, so each one's place in the answers shows where it was handled."""
    import websockets

    from tests.conftest import API_KEY

    url = server_url.replace("http://", "ws://") + "/v1/realtime?model=vita"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"

        def append(event_id: str, audio: str = AUDIO) -> str:
            return json.dumps({"type": APPEND, "audio": audio, "event_id": event_id})

        update = json.dumps({"type": "session.update", "event_id": "u", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": None}}}})
        for round_ in range(3):
            burst = [append(f"ok{round_}"), update, append(f"bad{round_}a", "%%%"), append(f"ok{round_}b"),
                     append(f"bad{round_}b", "not base64!")]
            await ws.send(burst[0])
            await asyncio.sleep(0.05)  # the session waits again: the next append may be taken directly
            for text in burst[1:]:
                await ws.send(text)
            answers = []
            async with asyncio.timeout(30):
                while len(answers) < 3:
                    event = json.loads(await ws.recv())
                    if event["type"] == "session.updated":
                        answers.append("u")
                    elif event["type"] == "error":
                        answers.append(event["error"]["event_id"])
            assert answers == ["u", f"bad{round_}a", f"bad{round_}b"]


# --- appended audio held back until it can complete a VAD window (switch "defer") ---------------------------


def test_held_audio_changes_nothing_the_vad_does_and_when() -> None:
    """The realtime append path (`RealtimeConnection._hold` / `_with_held` / `_new_hold_room`) against a real
    resampler and VAD stream: after every 20 ms append, the VAD has scored exactly the windows, with exactly the events, it
    scores when every append is pushed at once; about a third of the appends wait (32 ms windows, 20 ms
    events), so the one-pass-per-window saving is real. Odd chunk sizes and malformed appends (an odd byte
    count: refused, the held audio pushed on its own before it) are in the stream."""
    from duplex.vad_hub import VadHub
    from server.resampling import StreamResampler
    from server.wire.audio_codec import AudioFormat

    speech, _ = compose([("silence", 0.5), ("speech", "What is the weather like in Paris today?"), ("silence", 0.9),
                         ("speech", "And tomorrow?"), ("silence", 0.7)], sample_rate=24000)
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
    sizes = [960] * 40 + [962, 958, 7, 1440, 480, 2]  # bytes per append (odd: malformed, refused)
    for i in range((len(pcm) - sum(n for n in sizes if n % 2 == 0)) // 960):
        sizes += [960, 3] if i % 23 == 22 else [960]  # a malformed one now and then, some while audio is held
    hub = VadHub(SileroModel())

    def run(hold: bool, watched: bool = False) -> tuple[list[tuple[int, int]], list[tuple[str, int]], int]:
        events: list[tuple[str, int]] = []
        hub.add("s", VadParams(silence_duration_ms=300), lambda e: events.append((type(e).__name__, e.start_sample)))
        stream = hub._bank.stream("s")
        conn: Any = SimpleNamespace(
            _defer=hold, _held_audio=[], _held_wire=0, _hold_room=0, _hold_width=2,
            to_16k=StreamResampler(24000, 16000),
            config=SimpleNamespace(turn_detection=object(), input_format=AudioFormat("pcm16", 24000)),
            session=SimpleNamespace(mic_watched=watched, audio_slack=lambda: hub.samples_until_window("s")))
        # the connection's own methods, with decoding and the session's push as _append_samples/_take_audio do them
        conn._append_samples = lambda raw, event_id: conn.to_16k(np.frombuffer(raw, "<i2").astype(np.float32) / 32768)
        conn._take_audio = lambda samples: hub.push("s", samples)
        for name in ("_new_hold_room", "_release_held"):
            setattr(conn, name, getattr(RealtimeConnection, name).__get__(conn))

        def on_append(raw: bytes) -> bool:  # RealtimeConnection._on_append after its checks; True: a pass
            if RealtimeConnection._hold(conn, raw):
                return False
            if conn._held_audio:
                raw = RealtimeConnection._with_held(conn, raw)
            if len(raw) % 2:  # _append_samples refuses it (an error event) before anything else happens
                return True
            conn._take_audio(conn._append_samples(raw, None))
            conn._new_hold_room()
            return True

        scored, passes, pos = [], 0, 0
        for size in sizes:
            if size % 2:  # a malformed append: refused, so the stream goes on from where it was
                raw = b"\x01" * size
            else:
                raw, pos = pcm[pos : pos + size], pos + size
            passes += on_append(raw)
            scored.append((stream.processed, len(events)))  # windows scored and events after this append
        hub.remove("s")
        return scored, events, passes

    held_scored, held_events, passes = run(hold=True)
    plain_scored, plain_events, every = run(hold=False)
    assert every == len(sizes) and len(plain_events) >= 4 and sizes.count(3) >= 8
    assert held_scored == plain_scored and held_events == plain_events
    assert 0.55 * every < passes < 0.75 * every, (passes, every)
    assert run(hold=True, watched=True)[2] == every  # while the session watches the microphone, nothing waits


@pytest.mark.vllm
async def test_a_server_holding_audio_back_reports_every_segment_where_the_audio_puts_it(server_url: str) -> None:
    """Against the real server (holding on, its default; no responses, so nothing stops it): 20 ms appends
    with a malformed one between them give the VAD events a local run of the same pipeline gives (int16,
    the streaming resampler, silero with the session's parameters) at the same sample positions: no audio
    lost, reordered or counted twice while held. The malformed append is refused with its event id."""
    import websockets

    from duplex.vad import VadStream
    from server.resampling import StreamResampler
    from tests.conftest import API_KEY

    speech, _ = compose([("silence", 0.5), ("speech", "What is the weather like in Paris today?"), ("silence", 1.0),
                         ("speech", "And tomorrow?"), ("silence", 1.0)], sample_rate=24000)
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
    chunks = [pcm[i : i + 960] for i in range(0, len(pcm) - len(pcm) % 960, 960)]
    params = VadParams(threshold=0.5, prefix_padding_ms=300.0, silence_duration_ms=400.0)
    resampler, stream, expected = StreamResampler(24000, 16000), VadStream(params), []
    for chunk in chunks:
        stream.push(resampler(np.frombuffer(chunk, "<i2").astype(np.float32) / 32768))
        for event in stream.process(SileroModel()):
            if hasattr(event, "audio"):
                expected.append(("input_audio_buffer.speech_stopped", event.end_sample // 16))
            elif type(event).__name__ == "VadSpeechStart":
                expected.append(("input_audio_buffer.speech_started", event.start_sample // 16))
    assert len(expected) == 4

    url = server_url.replace("http://", "ws://") + "/v1/realtime?model=vita"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": 400, "create_response": False}}}}}))
        for i, chunk in enumerate(chunks):
            await ws.send(json.dumps({"type": APPEND, "audio": base64.b64encode(chunk).decode()}))
            if i == 60:
                await ws.send(json.dumps({"type": APPEND, "audio": base64.b64encode(b"odd").decode(),
                                          "event_id": "odd"}))
        got, refused = [], []
        async with asyncio.timeout(60):
            while len(got) < len(expected):
                event = json.loads(await ws.recv())
                if event["type"] == "error":
                    refused.append((event["error"]["event_id"], event["error"]["code"]))
                elif event["type"] == "input_audio_buffer.speech_started":
                    got.append((event["type"], event["audio_start_ms"]))
                elif event["type"] == "input_audio_buffer.speech_stopped":
                    got.append((event["type"], event["audio_end_ms"]))
    assert got == expected
    assert refused == [("odd", "invalid_audio")]


def test_every_switch_can_be_turned_off() -> None:
    """Each optimisation bench/load.py --compare names (HOT_PATHS) is a value hot_path_off accepts, and back."""
    from typing import get_args

    from server.settings import HOT_PATHS, HotPath, ServerSettings

    assert set(get_args(HotPath)) == set(HOT_PATHS)
    assert ServerSettings(hot_path_off=list(HOT_PATHS)).hot_path_off == list(HOT_PATHS)
