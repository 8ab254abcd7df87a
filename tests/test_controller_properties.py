"""Random interleavings of user, engine, TTS and playback events against the duplex controller.

A small simulated world carries out the controller's actions: engines answer `StartGeneration` with a
random script of token deltas and an end, TTS answers `Speak` with random chunks (sentences possibly in
parallel), the client buffers and plays emitted audio and the pacer answers `PauseOutput`. Every source
keeps its own order, but hypothesis picks which source speaks next, so late deltas after an abort,
stale TTS chunks after a cancel and pause replies after a verdict all happen. The invariants are
checked after every action and once everything has drained.

The state table is checked on the way: every (state, event) pair the world reaches is a row of
`TRANSITIONS` or an expected late pair of `LATE` (which changes nothing), no `IllegalTransition` is
raised, and seeded worlds reach every row of both.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplex.controller import LATE, TRANSITIONS, ControllerSettings, IllegalTransition, State, StateTokens
from duplex.events import (
    AbortGeneration,
    Action,
    CancelSpeech,
    ClearOutput,
    ClientCancel,
    ClientTruncate,
    EmitAudio,
    EmitText,
    Event,
    FinishReason,
    FrameCaptured,
    GenerationEnded,
    InputText,
    PauseOutput,
    PlaybackPosition,
    ResponseDone,
    ResponseRequested,
    ResponseStarted,
    ResponseTruncated,
    ResumeOutput,
    RolesSwapped,
    SentenceSynthesized,
    SessionUpdated,
    Speak,
    SpeechDiscarded,
    SpeechEnded,
    SpeechStarted,
    SpeechSynthesized,
    StartGeneration,
    TextInput,
    TokenDelta,
    UserItem,
)
from tests.controller_helpers import DuplexController

ST = StateTokens(query=1, noise=2, text=3)
FORBIDDEN_IN_TEXT = ("☞", "☟", "☜", "<|im_end|>")
WORDS = ("a ", "bb. ", "c! ", "d\n", "e? ", " ", "<|im_end|>")

# Weighted so that answers often get to speak before something interrupts them.
OPS = (
    ("deliver",) * 12
    + ("play",) * 4
    + ("speech_start", "speech_end") * 2
    + ("speech_discard", "text", "cancel", "truncate", "frame", "manual")
)
RARE = {"text", "cancel", "truncate", "manual"}  # taken one time in three
# Only for the table coverage test: a settings update that changes no invariant, a VAD discard of a
# segment whose start was never announced (the echo gate withheld it), a truncation of the active answer.
COVERAGE_OPS = (*OPS, "instructions", "stray_discard", "truncate_active")

Stream = tuple[str, ...]
ENDS: tuple[FinishReason, ...] = ("stop", "length", "error", "abort")


class World:
    def __init__(self, cfg: ControllerSettings, seed: int, tokenless: float = 0.0) -> None:
        self.cfg = cfg
        self.rnd = random.Random(seed)
        self.tokenless = tokenless  # share of requests that end before their first token
        self.ctl = DuplexController(cfg, session_id="p")
        self.streams: dict[Stream, deque[Event]] = {}
        self.now = 0
        self.speech_start: int | None = None
        self.generator, self.monitor = 0, 1 if cfg.engines == 2 else 0
        self.running: set[str] = set()  # started, neither ended nor aborted
        self.probes: set[str] = set()  # running probes with no verdict yet
        self.response_request: dict[str, str] = {}
        self.done: dict[str, str] = {}
        self.truncated: set[str] = set()
        self.finished: list[str] = []  # response ids in the order they ended
        self.active: str | None = None
        self.text: dict[str, str] = {}
        self.sentences: dict[str, int] = {}
        self.sentence_audio: dict[tuple[str, int], list[int]] = {}
        self.heard: dict[str, list[int]] = {}
        self.buffer: dict[str, list[int]] = {}
        self.reported: dict[str, int] = {}
        self.paused: set[str] = set()
        self.next_sample = 0
        self.reached: set[tuple[State, type[Event]]] = set()  # (state, event type) pairs of the table

    # --- driving ---------------------------------------------------------------------------------

    def send(self, event: Event) -> None:
        stale = isinstance(event, (TokenDelta, GenerationEnded)) and event.request_id not in self.running
        if isinstance(event, GenerationEnded) and event.request_id in self.running:
            self.running.discard(event.request_id)
            self.probes.discard(event.request_id)
        key = (self.ctl.state_of(event), type(event))
        assert key in TRANSITIONS or key in LATE, f"{key} is neither a transition nor expected late"
        self.reached.add(key)
        try:
            actions = self.ctl.handle(event)  # must never raise
        except IllegalTransition as exc:
            raise AssertionError(f"a legal sequence raised: {exc}") from exc
        if key in LATE:
            assert actions == [], f"expected late output must be dropped: {key} gave {actions}"
        if stale:
            assert actions == [], f"late output of a finished request must be absorbed: {actions}"
        for action in actions:
            self.apply(action)
        self.check_state()

    def step(self, op: str, arg: int) -> None:
        if op in RARE and arg % 3:
            return
        if op == "deliver" and self.streams:
            keys = sorted(self.streams)
            key = keys[arg % len(keys)]
            event = self.streams[key].popleft()
            if not self.streams[key]:
                del self.streams[key]
            self.send(event)
        elif op == "play":
            self.play(arg % 6 + 1)
        elif op == "speech_start":
            self.now += arg % 4000 + 1
            if self.speech_start is None:
                self.speech_start = self.now
            self.send(SpeechStarted(self.now))  # a repeated start must be harmless
        elif op == "speech_end":
            start = self.speech_start if self.speech_start is not None else self.now
            self.speech_start = None
            self.now += arg % 8000 + 1
            self.send(SpeechEnded(start, self.now, f"clip{self.now}"))
        elif op == "speech_discard" and self.speech_start is not None:
            start, self.speech_start = self.speech_start, None
            self.now += arg % 3000 + 1
            self.send(SpeechDiscarded(start, self.now))
        elif op == "text":
            self.send(TextInput("hello?"))
        elif op == "cancel":
            self.send(ClientCancel())
        elif op == "truncate":
            targets = sorted(self.response_request) + ["p-resp-999"]
            self.send(ClientTruncate(targets[arg % len(targets)], arg % 40))
        elif op == "frame":
            self.now += arg % 3000
            self.send(FrameCaptured(f"frame{self.now}", self.now))
        elif op == "manual":
            self.send(UserItem((InputText("typed"),)))
            self.send(ResponseRequested(force=arg % 2 == 0))
        elif op == "instructions":
            self.send(SessionUpdated(instructions=("", "Be brief.")[arg % 2]))
        elif op == "truncate_active" and self.active is not None:
            self.send(ClientTruncate(self.active, arg % 40))
        elif op == "stray_discard" and self.speech_start is None:
            self.now += arg % 3000 + 1
            self.send(SpeechDiscarded(self.now - 1, self.now))

    def drain(self) -> None:
        if self.speech_start is not None:
            self.step("speech_end", 1)
        for _ in range(10_000):
            if self.streams:
                self.step("deliver", 0)
            elif not self.play(10**9):
                return
        raise AssertionError("the world did not settle")

    def play(self, samples: int) -> bool:
        """The client plays from the active response; the pacer reports once all emitted audio is out."""
        response = self.active
        if response is None or response in self.paused:
            return False
        buffer = self.buffer.setdefault(response, [])
        heard = self.heard.setdefault(response, [])
        count = min(samples, len(buffer))
        heard.extend(buffer[:count])
        del buffer[:count]
        if not buffer and self.reported.get(response) != len(heard):
            self.reported[response] = len(heard)
            self.push(("pacer", response), PlaybackPosition(response, len(heard), reply_to_pause=False))
            return True
        return count > 0

    def push(self, key: Stream, *events: Event) -> None:
        self.streams.setdefault(key, deque()).extend(events)

    # --- carrying out actions, checking each ----------------------------------------------------

    def apply(self, a: Action) -> None:
        if isinstance(a, StartGeneration):
            self.start(a)
        elif isinstance(a, AbortGeneration):
            assert a.request_id in self.running, f"abort of a request that is not running: {a}"
            self.running.discard(a.request_id)
            self.probes.discard(a.request_id)
            self.abort_script(a.request_id)
        elif isinstance(a, RolesSwapped):
            assert self.cfg.engines == 2 and a.generator != a.monitor
            assert (a.generator, a.monitor) == (self.monitor, self.generator)
            self.generator, self.monitor = a.generator, a.monitor
        elif isinstance(a, ResponseStarted):
            self.response_started(a)
        elif isinstance(a, ResponseDone):
            self.response_done(a)
        elif isinstance(a, EmitText):
            assert a.response_id == self.active, "text of a response that is not active"
            assert a.delta and not any(s in a.delta for s in FORBIDDEN_IN_TEXT), a.delta
            self.text[a.response_id] = self.text.get(a.response_id, "") + a.delta
        elif isinstance(a, Speak):
            self.speak(a)
        elif isinstance(a, CancelSpeech):
            self.cancel_speech(a.response_id)
        elif isinstance(a, EmitAudio):
            self.emit_audio(a)
        elif isinstance(a, PauseOutput):
            assert a.response_id == self.active and a.response_id not in self.paused
            self.paused.add(a.response_id)
            self.buffer.get(a.response_id, []).clear()
            played = len(self.heard.get(a.response_id, []))
            self.reported[a.response_id] = played
            self.push(("pacer", a.response_id), PlaybackPosition(a.response_id, played))
        elif isinstance(a, ResumeOutput):
            assert a.response_id in self.paused, "resume without a pause"
            self.paused.discard(a.response_id)
        elif isinstance(a, ClearOutput):
            self.buffer.get(a.response_id, []).clear()
        elif isinstance(a, ResponseTruncated):
            assert self.text.get(a.response_id, "").strip().startswith(a.text)
            self.truncated.add(a.response_id)

    def start(self, a: StartGeneration) -> None:
        assert a.request_id not in self.running and a.request_id not in self.response_request.values()
        expected = self.monitor if a.role == "probe" else self.generator
        assert a.engine == expected, f"{a.role} on engine {a.engine}, expected {expected}"
        self.running.add(a.request_id)
        if a.role == "probe":
            self.probes.add(a.request_id)
        else:
            assert a.prompt.text is not None and "typed" in a.prompt.text  # forced answers are manual turns
        tokens: list[tuple[int, str]] = []
        if self.tokenless and self.rnd.random() < self.tokenless:
            ended = self.rnd.choice(ENDS)
            self.push(("gen", a.request_id), GenerationEnded(a.request_id, ended))
            return
        first = self.rnd.choice(("query", "query", "query", "noise", "noise", "text", "other", "none"))
        if self.cfg.state_tokens is None and first in ("query", "noise", "text"):
            first = "other"  # a checkpoint without state tokens never produces them
        if first != "none":
            tokens.append({"query": (1, "☞"), "noise": (2, "☟"), "text": (3, "☜")}.get(first, (50, "Hm ")))
        tokens += [(100 + i, self.rnd.choice(WORDS)) for i in range(self.rnd.randint(0, 10))]
        script: list[Event] = []
        while tokens:  # the first delta may carry the state token and more
            size = self.rnd.randint(1, 3)
            group, tokens = tokens[:size], tokens[size:]
            script.append(TokenDelta(a.request_id, tuple(t for t, _ in group), "".join(s for _, s in group)))
        reason = self.rnd.choice(("stop",) * 8 + ("length", "error", "abort"))
        script.append(GenerationEnded(a.request_id, reason, "boom" if reason == "error" else None))  # type: ignore[arg-type]
        self.push(("gen", a.request_id), *script)

    def abort_script(self, request_id: str) -> None:
        """In-flight output may still arrive after an abort, then the engine confirms it."""
        pending = list(self.streams.pop(("gen", request_id), deque()))
        kept = pending[: self.rnd.randint(0, 2)]
        if not any(isinstance(e, GenerationEnded) for e in kept):
            kept.append(GenerationEnded(request_id, "abort"))
        self.push(("gen", request_id), *kept)

    def response_started(self, a: ResponseStarted) -> None:
        assert a.response_id not in self.response_request, "response ids must be new"
        assert self.active is None, "two active responses"
        assert a.request_id in self.running
        answering = [
            r for rid, r in self.response_request.items() if rid not in self.done and r in self.running
        ]
        assert not answering, "two answering requests"
        self.probes.discard(a.request_id)
        self.response_request[a.response_id] = a.request_id
        self.active = a.response_id

    def response_done(self, a: ResponseDone) -> None:
        assert a.response_id == self.active, "ResponseDone of a response that is not active"
        assert self.response_request[a.response_id] not in self.running, "its generation outlives it"
        if a.reason == "turn_detected":
            assert self.cfg.interrupt_response, "interrupt_response=False never interrupts"
        self.done[a.response_id] = a.status
        self.finished.append(a.response_id)
        self.active = None
        self.paused.discard(a.response_id)
        if a.status in ("completed", "incomplete") and self.cfg.audio_output:
            count = self.sentences.get(a.response_id, 0)
            full = [s for i in range(count) for s in self.sentence_audio.get((a.response_id, i), [])]
            assert self.heard.get(a.response_id, []) == full, "the client must have heard every sample once"
            assert not self.buffer.get(a.response_id)

    def speak(self, a: Speak) -> None:
        assert self.cfg.audio_output and a.response_id == self.active
        assert a.sentence_index == self.sentences.get(a.response_id, 0), "sentences are numbered in order"
        assert a.text.strip() and not any(s in a.text for s in FORBIDDEN_IN_TEXT)
        self.sentences[a.response_id] = a.sentence_index + 1
        events: list[Event] = []
        for _ in range(self.rnd.randint(0, 3)):
            n = self.rnd.randint(1, 3)
            pcm = list(range(self.next_sample, self.next_sample + n))
            self.next_sample += n
            self.sentence_audio.setdefault((a.response_id, a.sentence_index), []).extend(pcm)
            events.append(SpeechSynthesized(a.response_id, a.sentence_index, pcm, n))
        events.append(SentenceSynthesized(a.response_id, a.sentence_index))
        self.push(("tts", a.response_id, str(a.sentence_index)), *events)

    def cancel_speech(self, response_id: str) -> None:
        for key in [k for k in self.streams if k[:2] == ("tts", response_id)]:
            if self.rnd.random() < 0.5:  # a chunk already on its way arrives anyway
                self.streams[key] = deque(list(self.streams[key])[:1])
            else:
                del self.streams[key]

    def emit_audio(self, a: EmitAudio) -> None:
        assert a.response_id == self.active, "audio of a response that is not active"
        assert a.response_id not in self.paused, "audio while paused"
        if self.cfg.interrupt_response:
            assert self.speech_start is None, "audio while the user speaks"
            assert not self.probes, "audio while a verdict is pending"
        heard = self.heard.setdefault(a.response_id, [])
        buffer = self.buffer.setdefault(a.response_id, [])
        assert a.start_sample == len(heard) + len(buffer), "audio must continue where the client is"
        samples = list(a.pcm)[a.offset : a.offset + a.num_samples]  # type: ignore[call-overload]
        assert a.num_samples > 0 and len(samples) == a.num_samples
        buffer.extend(samples)

    # --- whole-state checks ---------------------------------------------------------------------

    def check_state(self) -> None:
        live = self.ctl.live_requests()
        assert set(live) == self.running, f"controller tracks {set(live)}, world runs {self.running}"
        assert sum(role == "answer" for role in live.values()) <= 1
        assert self.ctl.current_response_id == self.active
        assert self.paused <= ({self.active} if self.active else set())
        if self.cfg.interrupt_response and self.active and (self.speech_start is not None or self.probes):
            assert self.active in self.paused or not self.buffer.get(self.active), "audio plays over the user"
        # Every ended answer enters history (noise never does), the oldest leave first.
        kept = self.finished[-self.cfg.history_turns :] if self.cfg.history_turns else []
        assert [rid for rid, _ in self.ctl.history.items()] == kept
        for response_id, turn in self.ctl.history.items():
            text = self.text.get(response_id, "").strip()
            reply = turn.assistant
            for state in ("☞", "☟", "☜"):
                reply = reply.removeprefix(state)
            assert text.startswith(reply), f"history holds text never emitted: {reply!r} vs {text!r}"
            if (
                self.done.get(response_id) in ("completed", "incomplete")
                and response_id not in self.truncated
            ):
                assert reply == text, "a completed answer keeps all its text"

    def check_final(self) -> None:
        assert self.running == set() and self.ctl.live_requests() == {}
        assert self.active is None and self.ctl.current_response_id is None
        assert set(self.done) == set(self.response_request), "every response ends"
        assert not self.paused


configs = st.builds(
    ControllerSettings,
    engines=st.sampled_from((1, 2)),
    interrupt_response=st.booleans(),
    create_response=st.booleans(),
    history_turns=st.integers(0, 3),
    state_tokens=st.sampled_from((ST, ST, None)),
    no_state_token_policy=st.sampled_from(("answer", "ignore")),
    output_sample_rate=st.just(1000),
    audio_output=st.booleans(),
)
ops = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10**6)), min_size=40, max_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, steps=ops, seed=st.integers(0, 2**32 - 1))
def test_invariants_hold_for_any_interleaving(
    cfg: ControllerSettings, steps: list[tuple[str, int]], seed: int
) -> None:
    world = World(cfg, seed)
    for op, arg in steps:
        world.step(op, arg)
    world.drain()
    world.check_final()


def test_random_worlds_reach_every_row_of_the_table() -> None:
    """No dead rows: seeded worlds reach every transition and every expected late pair."""
    rnd = random.Random(20240610)
    reached: set[tuple[State, type[Event]]] = set()
    for _ in range(400):  # all rows by about 50-250 worlds, whatever the seed
        cfg = ControllerSettings(
            engines=rnd.choice((1, 2)),
            interrupt_response=rnd.random() < 0.8,
            create_response=rnd.random() < 0.8,
            history_turns=rnd.randint(0, 3),
            state_tokens=rnd.choice((ST, ST, None)),
            no_state_token_policy=rnd.choice(("answer", "ignore")),
            output_sample_rate=1000,
            audio_output=rnd.random() < 0.8,
        )
        world = World(cfg, rnd.randrange(2**32), tokenless=0.1)
        for _ in range(rnd.randint(40, 200)):
            world.step(rnd.choice(COVERAGE_OPS), rnd.randrange(10**6))
        world.drain()
        world.check_final()
        reached |= world.reached
    missing = sorted(f"{state} + {event.__name__}" for state, event in (set(TRANSITIONS) | LATE) - reached)
    assert not missing, f"rows no random world reaches: {missing}"


def test_an_illegal_pair_raises() -> None:
    """TTS audio for a text-only answer: no Speak was ever sent, so the runtime broke the protocol."""
    world = World(ControllerSettings(state_tokens=ST, audio_output=False, output_sample_rate=1000), 0)
    world.send(UserItem((InputText("typed"),)))
    world.send(ResponseRequested())
    response = world.active
    assert response is not None
    event = SpeechSynthesized(response, 0, [1], 1)
    assert (world.ctl.state_of(event), SpeechSynthesized) not in set(TRANSITIONS) | LATE
    with pytest.raises(IllegalTransition, match="SpeechSynthesized is not allowed in state Output.SILENT"):
        world.ctl.handle(event)
