"""The duplex controller driven by plain event lists: no engine, no TTS, no clock, no sleep."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import pytest

from duplex.controller import ControllerSettings, StateTokens
from duplex.events import (
    AbortGeneration,
    Action,
    CancelSpeech,
    ClearOutput,
    ClientCancel,
    ClientTruncate,
    EmitAudio,
    EmitText,
    Error,
    Event,
    FrameCaptured,
    GenerationEnded,
    HistoryTurn,
    InputAudio,
    InputImage,
    InputText,
    PauseOutput,
    PlaybackPosition,
    ResponseDone,
    ResponseRequested,
    ResponseStarted,
    ResponseTruncated,
    ResumeOutput,
    RolesSwapped,
    SegmentClassified,
    SentenceSynthesized,
    SessionUpdated,
    Speak,
    SpeechDiscarded,
    SpeechEnded,
    SpeechStarted,
    SpeechStoppedNotice,
    SpeechSynthesized,
    StartGeneration,
    TextInput,
    TokenDelta,
    UserItem,
)
from duplex.history import History, SpokenSentence, played_text
from tests.controller_helpers import DuplexController, SimpleChunker

ST = StateTokens(query=1, noise=2, text=3)
QUERY, NOISE, TEXT = 1, 2, 3
WORD = 100  # any ordinary token id
RATE = 1000  # output samples per second: 1 ms == 1 sample keeps truncation arithmetic readable

A = TypeVar("A", bound=Action)


def only(actions: Iterable[Action], kind: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def one(actions: Iterable[Action], kind: type[A]) -> A:
    found = only(actions, kind)
    assert len(found) == 1, f"expected one {kind.__name__}, got {found}"
    return found[0]


def kinds(actions: Iterable[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


class Client:
    """What the user hears: emitted audio plays in order; PauseOutput/ClearOutput drop the unplayed rest."""

    def __init__(self) -> None:
        self.heard: dict[str, list[int]] = {}
        self.buffer: dict[str, list[int]] = {}
        self.paused: set[str] = set()

    def apply(self, actions: Iterable[Action]) -> None:
        for a in actions:
            if isinstance(a, EmitAudio):
                assert a.response_id not in self.paused, "audio emitted while paused"
                heard, buffer = (
                    self.heard.setdefault(a.response_id, []),
                    self.buffer.setdefault(a.response_id, []),
                )
                assert a.start_sample == len(heard) + len(buffer), "audio must continue where the client is"
                samples = list(a.pcm)[a.offset : a.offset + a.num_samples]  # type: ignore[call-overload]
                assert len(samples) == a.num_samples
                buffer.extend(samples)
            elif isinstance(a, PauseOutput):
                self.paused.add(a.response_id)
                self.buffer.get(a.response_id, []).clear()
            elif isinstance(a, ResumeOutput):
                self.paused.discard(a.response_id)
            elif isinstance(a, ClearOutput):
                self.buffer.get(a.response_id, []).clear()

    def play(self, response_id: str, samples: int | None = None) -> int:
        """Play some (default: all) buffered samples; return the played position."""
        buffer = self.buffer.setdefault(response_id, [])
        count = len(buffer) if samples is None else min(samples, len(buffer))
        self.heard.setdefault(response_id, []).extend(buffer[:count])
        del buffer[:count]
        return len(self.heard[response_id])


class Session:
    def __init__(self, controller: DuplexController | None = None, **settings: object) -> None:
        self.ctl = controller or DuplexController(
            ControllerSettings(**{"state_tokens": ST, "output_sample_rate": RATE, **settings}),  # type: ignore[arg-type]
            session_id="t",
        )
        self.client = Client()
        self.log: list[Action] = []
        self._next_sample = 0
        self.full_audio: dict[str, list[int]] = {}
        self._sentence_audio: dict[tuple[str, int], list[int]] = {}

    def send(self, *events: Event) -> list[Action]:
        out: list[Action] = []
        for event in events:
            actions = self.ctl.handle(event)
            self.client.apply(actions)
            self.log += actions
            out += actions
        return out

    def segment(self, start: int = 0, end: int = 16000, audio: object = "clip") -> str:
        """A spoken segment; returns the probe's request id."""
        self.send(SpeechStarted(start))
        return one(self.send(SpeechEnded(start, end, audio)), StartGeneration).request_id

    def pcm(self, n: int) -> list[int]:
        self._next_sample += n
        return list(range(self._next_sample - n, self._next_sample))

    def chunk(self, response_id: str, index: int, n: int) -> list[Action]:
        pcm = self.pcm(n)
        self._sentence_audio.setdefault((response_id, index), []).extend(pcm)
        return self.send(SpeechSynthesized(response_id, index, pcm, n))

    def synthesize(self, speaks: Iterable[Speak], sizes: Iterable[int] = (3, 2)) -> list[Action]:
        """TTS each sentence in chunks of ``sizes`` samples, then mark it done."""
        out: list[Action] = []
        for speak in speaks:
            for n in sizes:
                out += self.chunk(speak.response_id, speak.sentence_index, n)
            out += self.send(SentenceSynthesized(speak.response_id, speak.sentence_index))
        return out

    def response_audio(self, response_id: str) -> list[int]:
        """The response's whole audio in sentence order, as TTS produced it."""
        indices = sorted(i for (rid, i) in self._sentence_audio if rid == response_id)
        return [s for i in indices for s in self._sentence_audio[(response_id, i)]]

    def answer(self, text: str = "Hello there. Bye!") -> tuple[str, str]:
        """A spoken query answered with ``text``, spoken and played to the end; returns (request, response)."""
        request = self.segment()
        actions = self.send(TokenDelta(request, (QUERY, WORD), "☞" + text))
        actions += self.send(GenerationEnded(request, "stop"))
        response = one(actions, ResponseStarted).response_id
        self.synthesize(only(actions, Speak))
        played = self.client.play(response)
        done = self.send(PlaybackPosition(response, played, reply_to_pause=False))
        assert one(done, ResponseDone).status == "completed"
        return request, response

    def speaking(self, text: str = "One two three. Four five six. ") -> tuple[str, str, list[Speak]]:
        """Start an answer whose first sentences are synthesized and emitted (still generating)."""
        request = self.segment()
        actions = self.send(TokenDelta(request, (QUERY, WORD, WORD), "☞" + text))
        response = one(actions, ResponseStarted).response_id
        speaks = only(actions, Speak)
        self.synthesize(speaks)
        return request, response, speaks


# --- the basic flows ----------------------------------------------------------------------------


def test_query_is_answered_with_text_speech_audio_and_history() -> None:
    s = Session()
    started = s.send(SpeechStarted(0))
    assert kinds(started) == ["SpeechStartedNotice"]
    ended = s.send(SpeechEnded(0, 16000, "clip"))
    assert isinstance(ended[0], SpeechStoppedNotice)
    probe = one(ended, StartGeneration)
    assert (probe.role, probe.engine) == ("probe", 1)  # the monitor
    assert probe.prompt.modality == "audio" and probe.prompt.audio == ("clip",) and probe.prompt.history == ()

    first = s.send(TokenDelta(probe.request_id, (QUERY, WORD, WORD), "☞Hello there. How"))
    assert kinds(first) == ["SegmentClassified", "RolesSwapped", "ResponseStarted", "EmitText", "Speak"]
    assert one(first, SegmentClassified).kind == "query" and not one(first, SegmentClassified).ignored
    assert one(first, RolesSwapped) == RolesSwapped(generator=1, monitor=0)
    response = one(first, ResponseStarted).response_id
    assert response == "t-resp-1" and one(first, ResponseStarted).request_id == probe.request_id
    assert one(first, EmitText).delta == "Hello there. How"
    assert one(first, Speak) == Speak(response, 0, "Hello there.")

    more = s.send(TokenDelta(probe.request_id, (WORD, WORD), " are you?<|im_end|>"))
    assert one(more, EmitText).delta == " are you?"
    end = s.send(GenerationEnded(probe.request_id, "stop"))
    assert one(end, Speak) == Speak(response, 1, "How are you?")
    assert not only(end, ResponseDone)  # audio still to come

    audio = s.synthesize([one(first, Speak), one(end, Speak)])
    assert [(a.start_sample, a.num_samples) for a in only(audio, EmitAudio)] == [
        (0, 3),
        (3, 2),
        (5, 3),
        (8, 2),
    ]
    assert not only(audio, ResponseDone)  # not played yet
    played = s.client.play(response)
    done = s.send(PlaybackPosition(response, played, reply_to_pause=False))
    assert done == [ResponseDone(response, "completed", None)]
    assert s.client.heard[response] == s.response_audio(response)
    assert s.ctl.history.turns() == (
        HistoryTurn(user=(InputAudio("clip"),), assistant="☞Hello there. How are you?"),
    )
    assert s.ctl.live_requests() == {}


def test_noise_is_silent_and_leaves_no_trace() -> None:
    s = Session()
    request = s.segment()
    actions = s.send(TokenDelta(request, (NOISE, WORD), "☟Nice weather."))
    assert actions == [
        AbortGeneration(request),
        SegmentClassified("t-seg-1", "noise", 0, 16000, ignored=True, reason="noise"),
    ]
    assert s.send(GenerationEnded(request, "abort")) == []
    assert s.ctl.history.turns() == () and s.ctl.current_response_id is None
    assert (s.ctl.generator, s.ctl.monitor) == (0, 1)  # no swap on noise
    assert not only(s.log, EmitText) and not only(s.log, Speak) and not only(s.log, EmitAudio)


def test_barge_in_with_a_query_cancels_the_answer_and_swaps_roles() -> None:
    s = Session()
    old_request, old, _ = s.speaking()
    s.client.play(old, 4)
    pause = s.send(SpeechStarted(20000))
    assert kinds(pause) == ["PauseOutput", "SpeechStartedNotice"]
    assert s.send(PlaybackPosition(old, 4)) == []  # rewound, still held
    probe = one(s.send(SpeechEnded(20000, 36000, "clip2")), StartGeneration)
    assert (probe.engine, probe.role) == (0, "probe")  # engine 0 is the monitor after the first swap
    assert s.send(TokenDelta(old_request, (WORD,), " more")) == [EmitText(old, " more")]  # text still flows
    actions = s.send(TokenDelta(probe.request_id, (QUERY, WORD), "☞Sure."))
    assert kinds(actions)[:7] == [
        "SegmentClassified",
        "AbortGeneration",
        "CancelSpeech",
        "ClearOutput",
        "ResponseDone",
        "RolesSwapped",
        "ResponseStarted",
    ]
    assert one(actions, AbortGeneration).request_id == old_request
    assert one(actions, ResponseDone) == ResponseDone(old, "cancelled", "turn_detected")
    assert one(actions, RolesSwapped) == RolesSwapped(generator=0, monitor=1)
    new = one(actions, ResponseStarted).response_id
    assert new != old and s.ctl.current_response_id == new
    assert not only(actions, ResumeOutput)
    # The cancelled answer keeps what was heard: 4 of the first sentence's 5 samples -> "One two".
    assert s.ctl.history.turns()[0].assistant == "☞One two"
    assert s.send(GenerationEnded(old_request, "abort")) == []
    assert set(s.ctl.live_requests()) == {probe.request_id}


def test_barge_in_noise_resumes_with_no_audio_lost() -> None:
    s = Session()
    request, response, _ = s.speaking()
    s.client.play(response, 4)  # 10 samples emitted, 4 heard
    s.send(SpeechStarted(20000))
    assert response in s.client.paused and s.client.buffer[response] == []
    # TTS keeps going while paused: nothing is emitted.
    tail = s.send(TokenDelta(request, (WORD,), "Seven eight."), GenerationEnded(request, "stop"))
    assert not only(s.synthesize(only(tail, Speak)), EmitAudio)
    assert s.send(PlaybackPosition(response, 4)) == []
    probe = one(s.send(SpeechEnded(20000, 24000, "cough")), StartGeneration)
    actions = s.send(TokenDelta(probe.request_id, (NOISE,), "☟"))
    assert kinds(actions)[:3] == ["AbortGeneration", "SegmentClassified", "ResumeOutput"]
    emitted = only(actions, EmitAudio)
    assert (emitted[0].start_sample, emitted[0].offset) == (4, 1)  # into the middle of the 2nd chunk
    played = s.client.play(response)
    done = s.send(PlaybackPosition(response, played, reply_to_pause=False))
    assert one(done, ResponseDone).status == "completed"
    assert s.client.heard[response] == s.response_audio(response)  # every sample, once, in order
    assert s.ctl.history.turns()[-1].assistant == "☞One two three. Four five six. Seven eight."


def test_speech_discarded_while_paused_resumes() -> None:
    s = Session()
    _, response, _ = s.speaking()
    s.client.play(response, 7)
    s.send(SpeechStarted(20000))
    s.send(PlaybackPosition(response, 7))
    actions = s.send(SpeechDiscarded(20000, 21000))
    assert kinds(actions) == ["ResumeOutput", "EmitAudio", "EmitAudio", "SpeechStoppedNotice"]
    assert only(actions, EmitAudio)[0].start_sample == 7
    assert one(actions, SpeechStoppedNotice).committed is False


def test_resume_waits_for_the_pause_reply() -> None:
    """A blip that ends before the pacer answered: resume, but emit only once the position is known."""
    s = Session()
    _, response, _ = s.speaking()
    s.client.play(response, 3)
    s.send(SpeechStarted(20000))
    resumed = s.send(SpeechDiscarded(20000, 20100))
    assert kinds(resumed) == ["ResumeOutput", "SpeechStoppedNotice"]
    actions = s.send(PlaybackPosition(response, 3))
    assert only(actions, EmitAudio)[0].start_sample == 3


def test_text_query_while_speaking() -> None:
    s = Session()
    _, old, _ = s.speaking()
    actions = s.send(TextInput("What time is it?"))
    assert kinds(actions) == ["PauseOutput", "StartGeneration"]
    probe = one(actions, StartGeneration)
    assert probe.prompt.modality == "text" and probe.prompt.text == "What time is it?"
    assert probe.prompt.audio == () and probe.role == "probe"
    s.send(PlaybackPosition(old, 0))
    answer = s.send(TokenDelta(probe.request_id, (TEXT, WORD), "☜Noon."))
    assert one(answer, SegmentClassified).kind == "text"
    assert one(answer, ResponseDone) == ResponseDone(old, "cancelled", "turn_detected")
    new = one(answer, ResponseStarted)
    assert new.source == "text" and one(answer, EmitText).delta == "Noon."
    s.send(GenerationEnded(probe.request_id, "stop"))
    s.synthesize(only(s.log, Speak)[-1:])
    s.send(PlaybackPosition(new.response_id, s.client.play(new.response_id), reply_to_pause=False))
    turns = s.ctl.history.turns()
    assert turns[0].assistant == "☞"  # nothing of the old answer was heard: only its state token
    assert turns[1] == HistoryTurn(user=(InputText("What time is it?"),), assistant="☜Noon.")


def test_client_cancel() -> None:
    s = Session()
    request, response, _ = s.speaking()
    actions = s.send(ClientCancel())
    assert actions == [
        AbortGeneration(request),
        CancelSpeech(response),
        ClearOutput(response),
        ResponseDone(response, "cancelled", "client_cancelled"),
    ]
    again = s.send(ClientCancel())
    assert one(again, Error).code == "response_cancel_not_active"
    assert s.send(GenerationEnded(request, "abort")) == []
    assert s.send(SpeechSynthesized(response, 0, [1], 1)) == []  # stale TTS chunk: dropped
    assert s.ctl.live_requests() == {}


def test_engine_error_fails_the_answer_and_the_session_goes_on() -> None:
    s = Session()
    request = s.segment()
    response = one(s.send(TokenDelta(request, (QUERY,), "☞Hel")), ResponseStarted).response_id
    actions = s.send(GenerationEnded(request, "error", "CUDA out of memory"))
    assert one(actions, ResponseDone) == ResponseDone(response, "failed", "engine_error")
    assert "CUDA out of memory" in one(actions, Error).message
    assert not only(actions, AbortGeneration)  # it already ended
    _, second = s.answer("Fine.")
    assert second != response


def test_a_turn_over_the_context_clears_the_history_so_the_next_one_fits() -> None:
    s = Session()
    s.answer("Fine.")
    assert len(s.ctl.history.turns()) == 1
    request = s.segment(32000, 48000)
    response = one(s.send(TokenDelta(request, (QUERY,), "☞")), ResponseStarted).response_id
    actions = s.send(GenerationEnded(request, "error", "the prompt is 5000 tokens", code="context_length_exceeded"))
    assert one(actions, ResponseDone) == ResponseDone(response, "failed", "context_length_exceeded")
    assert one(actions, Error).code == "context_length_exceeded" and "history was cleared" in one(actions, Error).message
    assert s.ctl.history.turns() == ()  # neither the refused turn nor the one before it
    _, second = s.answer("Again.")
    assert second != response and len(s.ctl.history.turns()) == 1


def test_probe_error_is_only_an_error_notice() -> None:
    s = Session()
    request = s.segment()
    actions = s.send(GenerationEnded(request, "error", "boom"))
    assert kinds(actions) == ["Error"]
    assert s.ctl.live_requests() == {}


def test_truncation_keeps_only_the_played_text() -> None:
    s = Session()
    request = s.segment()
    first = s.send(TokenDelta(request, (QUERY, WORD), "☞Hello there. Second sentence here."))
    response = one(first, ResponseStarted).response_id
    speaks = only(first + s.send(GenerationEnded(request, "stop")), Speak)
    assert [sp.text for sp in speaks] == ["Hello there.", "Second sentence here."]
    s.synthesize(speaks, sizes=(100,))
    s.send(PlaybackPosition(response, s.client.play(response), reply_to_pause=False))
    assert s.ctl.history.turns()[0].assistant == "☞Hello there. Second sentence here."
    # The client says it played 150 ms of 200: half of the second sentence, cut at a word.
    truncated = s.send(ClientTruncate(response, 150))
    assert truncated == [ResponseTruncated(response, 150, "Hello there. Second")]
    assert s.ctl.history.turns()[0].assistant == "☞Hello there. Second"
    assert s.send(ClientTruncate(response, 99)) == [ResponseTruncated(response, 99, "Hello")]
    assert one(s.send(ClientTruncate("t-resp-99", 5)), Error).code == "truncate_unknown_response"


def test_truncating_the_current_answer_cancels_it_at_that_point() -> None:
    s = Session()
    request = s.segment()
    first = s.send(TokenDelta(request, (QUERY, WORD), "☞Hello there. Second sentence here. And"))
    response = one(first, ResponseStarted).response_id
    s.synthesize(only(first, Speak), sizes=(100,))
    actions = s.send(ClientTruncate(response, 120))
    assert one(actions, ResponseDone) == ResponseDone(response, "cancelled", "client_cancelled")
    assert one(actions, AbortGeneration).request_id == request
    assert one(actions, ResponseTruncated).text == "Hello there."


def test_late_pause_reply_fixes_the_history_of_a_cancelled_answer() -> None:
    s = Session()
    _, old, _ = s.speaking("Alpha beta gamma delta. ")
    s.client.play(old, 5)
    s.send(SpeechStarted(20000))
    probe = one(s.send(SpeechEnded(20000, 30000, "q")), StartGeneration)
    s.send(TokenDelta(probe.request_id, (QUERY,), "☞"))  # query verdict before the pause reply
    assert s.ctl.history.turns()[0].assistant == "☞"
    assert s.send(PlaybackPosition(old, 5)) == []
    assert s.ctl.history.turns()[0].assistant == "☞Alpha beta gamma delta."


# --- modes and settings -------------------------------------------------------------------------


def test_one_engine_mode_runs_both_roles_on_engine_0() -> None:
    s = Session(engines=1)
    _, old, _ = s.speaking()
    s.send(SpeechStarted(20000))
    probe = one(s.send(SpeechEnded(20000, 30000, "q")), StartGeneration)
    s.send(TokenDelta(probe.request_id, (QUERY,), "☞Yes."))
    starts = only(s.log, StartGeneration)
    assert len(starts) == 2 and {g.engine for g in starts} == {0}
    assert not only(s.log, RolesSwapped)
    assert (s.ctl.generator, s.ctl.monitor) == (0, 0)
    assert one(s.log, ResponseDone).response_id == old


def test_interrupt_response_false_never_pauses_and_ignores_queries_while_answering() -> None:
    s = Session(interrupt_response=False)
    request, response, _ = s.speaking()
    assert not only(s.send(SpeechStarted(20000)), PauseOutput)
    probe = one(s.send(SpeechEnded(20000, 30000, "q")), StartGeneration)
    actions = s.send(TokenDelta(probe.request_id, (QUERY,), "☞"))
    assert actions == [
        AbortGeneration(probe.request_id),
        SegmentClassified("t-seg-2", "query", 20000, 30000, ignored=True, reason="response_in_progress"),
    ]
    assert s.ctl.current_response_id == response
    more = s.send(TokenDelta(request, (WORD,), "Seven."), GenerationEnded(request, "stop"))
    assert only(s.synthesize(only(more, Speak)), EmitAudio)  # the answer carries on
    s.send(PlaybackPosition(response, s.client.play(response), reply_to_pause=False))
    assert s.client.heard[response] == s.response_audio(response)
    assert one(s.log, ResponseDone).status == "completed"
    _, second = s.answer("Now.")  # once idle, queries are answered again
    assert second != response


def test_create_response_false_gives_vad_events_and_manual_turns() -> None:
    s = Session(create_response=False)
    actions = s.send(SpeechStarted(0), SpeechEnded(0, 16000, "clip"))
    assert kinds(actions) == ["SpeechStartedNotice", "SpeechStoppedNotice"]
    assert not only(s.log, StartGeneration)
    start = one(s.send(ResponseRequested(instructions="Be brief.")), StartGeneration)
    assert (start.role, start.engine) == ("answer", 0)  # forced answers go to the generator
    assert start.prompt.audio == ("clip",) and start.prompt.instructions == "Be brief."
    response = one(s.log, ResponseStarted)
    assert response.source == "manual"
    text = s.send(TokenDelta(start.request_id, (NOISE, WORD), "☟Ok."))  # forced: no gating
    assert one(text, EmitText).delta == "Ok."
    assert not only(text, AbortGeneration)
    # A committed segment ends the running answer (interrupt_response), and never starts one.
    s.send(SpeechStarted(20000))
    ended = s.send(SpeechEnded(20000, 30000, "clip2"))
    assert one(ended, ResponseDone) == ResponseDone(response.response_id, "cancelled", "turn_detected")
    assert not only(ended, StartGeneration)
    assert s.ctl.history.turns()[0].assistant == "☟"  # forced answers keep the token VITA produced


def test_manual_turn_from_user_items() -> None:
    s = Session()
    assert one(s.send(ResponseRequested()), Error).code == "response_create_without_input"
    s.send(UserItem((InputText("Describe this."), InputImage("img"))))
    start = one(s.send(ResponseRequested()), StartGeneration)
    assert start.prompt.modality == "image" and start.prompt.frames == ("img",)
    assert start.prompt.text == "Describe this."
    s.send(UserItem((InputText("again"),)))
    assert one(s.send(ResponseRequested()), Error).code == "conversation_already_has_active_response"
    s.send(TokenDelta(start.request_id, (QUERY,), "☞A cat."), GenerationEnded(start.request_id, "stop"))
    s.synthesize(only(s.log, Speak), sizes=(4,))
    response = one(s.log, ResponseStarted).response_id
    s.send(PlaybackPosition(response, s.client.play(response), reply_to_pause=False))
    # History drops vision, as VITA's demos did.
    assert s.ctl.history.turns() == (HistoryTurn((InputText("Describe this."),), "☞A cat."),)


def test_gated_manual_turn_is_dropped_on_noise() -> None:
    s = Session()
    s.send(UserItem((InputAudio("clip"),)))
    probe = one(s.send(ResponseRequested(force=False)), StartGeneration)
    assert probe.role == "probe"
    assert one(s.send(TokenDelta(probe.request_id, (NOISE,), "☟")), SegmentClassified).kind == "noise"


def test_checkpoint_without_state_tokens() -> None:
    s = Session(state_tokens=None)
    request = s.segment()
    actions = s.send(TokenDelta(request, (WORD, WORD), "Hi there."))
    assert one(actions, SegmentClassified).kind == "unknown" and one(actions, ResponseStarted)
    s.send(GenerationEnded(request, "stop"))
    s.synthesize(only(s.log, Speak))
    response = one(s.log, ResponseStarted).response_id
    s.send(PlaybackPosition(response, s.client.play(response), reply_to_pause=False))
    assert s.ctl.history.turns()[0].assistant == "Hi there."

    ignoring = Session(state_tokens=None, no_state_token_policy="ignore")
    probe = ignoring.segment()
    actions = ignoring.send(TokenDelta(probe, (WORD,), "Hi"))
    assert actions == [
        AbortGeneration(probe),
        SegmentClassified("t-seg-1", "unknown", 0, 16000, ignored=True, reason="no_state_token"),
    ]


def test_unknown_first_token_follows_the_policy() -> None:
    answering = Session()
    request = answering.segment()
    assert one(answering.send(TokenDelta(request, (WORD,), "Hi")), SegmentClassified).kind == "unknown"
    assert answering.ctl.current_response_id is not None

    ignoring = Session(no_state_token_policy="ignore")
    probe = ignoring.segment()
    assert only(ignoring.send(TokenDelta(probe, (WORD,), "Hi")), AbortGeneration)


def test_first_token_together_with_more_tokens_in_one_delta() -> None:
    s = Session()
    request = s.segment()
    actions = s.send(TokenDelta(request, (QUERY, WORD, WORD, WORD), "☞ Yes. No."))
    assert [e.delta for e in only(actions, EmitText)] == ["Yes. No."]
    assert [sp.text for sp in only(actions, Speak)] == ["Yes."]
    assert not any("☞" in e.delta for e in only(s.log, EmitText))


def test_empty_first_delta_does_not_decide() -> None:
    s = Session()
    request = s.segment()
    assert s.send(TokenDelta(request, (), "")) == []
    assert one(s.send(TokenDelta(request, (NOISE,), "☟")), AbortGeneration)


def test_late_output_of_an_aborted_request_is_ignored() -> None:
    s = Session()
    request = s.segment()
    s.send(TokenDelta(request, (NOISE,), "☟"))
    assert s.send(TokenDelta(request, (WORD,), "late")) == []
    assert s.send(GenerationEnded(request, "abort")) == []
    assert s.send(GenerationEnded(request, "stop")) == []
    assert s.send(GenerationEnded("nobody", "error", "x")) == []
    assert s.send(PlaybackPosition("t-resp-42", 10)) == []
    assert s.send(SentenceSynthesized("t-resp-42", 0)) == []


def test_a_new_query_supersedes_older_pending_probes() -> None:
    s = Session()
    older = s.segment(0, 16000)
    newer = s.segment(20000, 36000)
    actions = s.send(TokenDelta(newer, (QUERY,), "☞"))
    assert AbortGeneration(older) in actions
    assert SegmentClassified("t-seg-1", "unknown", 0, 16000, ignored=True, reason="superseded") in actions
    assert s.send(TokenDelta(older, (QUERY,), "☞")) == []


def test_answer_starts_held_while_the_user_is_still_speaking() -> None:
    s = Session()
    first = s.segment(0, 16000)
    s.send(SpeechStarted(20000))  # the user goes on
    actions = s.send(TokenDelta(first, (QUERY, WORD), "☞Yes. "))
    response = one(actions, ResponseStarted).response_id
    assert not only(s.synthesize(only(actions, Speak)), EmitAudio) and s.ctl.output_held
    released = s.send(SpeechDiscarded(20000, 20500))
    assert not only(released, ResumeOutput)  # nothing had been sent, so nothing was paused
    assert [a.start_sample for a in only(released, EmitAudio)] == [0, 3]
    assert s.ctl.current_response_id == response


def test_parallel_tts_keeps_sentence_order() -> None:
    s = Session()
    request = s.segment()
    actions = s.send(TokenDelta(request, (QUERY,), "☞One. Two. Three."), GenerationEnded(request, "stop"))
    response = one(actions, ResponseStarted).response_id
    assert len(only(actions, Speak)) == 3
    assert not only(s.chunk(response, 2, 2) + s.chunk(response, 1, 2), EmitAudio)
    s.send(SentenceSynthesized(response, 1), SentenceSynthesized(response, 2))
    emitted = only(s.chunk(response, 0, 3), EmitAudio)
    assert [a.start_sample for a in emitted] == [0]
    emitted = only(s.send(SentenceSynthesized(response, 0)), EmitAudio)
    assert [a.start_sample for a in emitted] == [3, 5]
    done = s.send(PlaybackPosition(response, s.client.play(response), reply_to_pause=False))
    assert one(done, ResponseDone).status == "completed"
    assert s.client.heard[response] == s.response_audio(response)


def test_length_limit_is_incomplete_after_playback() -> None:
    s = Session()
    request = s.segment()
    actions = s.send(TokenDelta(request, (QUERY,), "☞Once upon"), GenerationEnded(request, "length"))
    response = one(actions, ResponseStarted).response_id
    s.synthesize(only(s.log, Speak))
    done = s.send(PlaybackPosition(response, s.client.play(response), reply_to_pause=False))
    assert one(done, ResponseDone) == ResponseDone(response, "incomplete", "max_output_tokens")


def test_text_only_output_completes_at_generation_end() -> None:
    s = Session(audio_output=False)
    request = s.segment()
    s.send(SpeechStarted(20000))  # no audio: nothing to pause
    actions = s.send(TokenDelta(request, (QUERY,), "☞Hi."), GenerationEnded(request, "stop"))
    assert not only(actions, Speak) and not only(actions, PauseOutput)
    assert one(actions, ResponseDone).status == "completed"
    assert s.ctl.history.turns()[0].assistant == "☞Hi."


def test_a_special_token_split_across_deltas_is_never_shown_nor_spoken() -> None:
    s = Session()
    request = s.segment()
    actions = s.send(TokenDelta(request, (QUERY, WORD), "☞ Yes.<|im_"), TokenDelta(request, (WORD,), "end|>"))
    actions += s.send(TokenDelta(request, (WORD,), " Fine <"), GenerationEnded(request, "stop"))
    assert "".join(e.delta for e in only(actions, EmitText)) == "Yes. Fine <"  # a held "<" was text
    assert [a.text for a in only(actions, Speak)] == ["Yes.", "Fine <"]
    response = one(actions, ResponseStarted).response_id
    s.synthesize(only(s.log, Speak))
    s.send(PlaybackPosition(response, s.client.play(response), reply_to_pause=False))
    assert s.ctl.history.turns()[0].assistant == "☞Yes. Fine <"


def test_frames_go_into_the_next_turn() -> None:
    s = Session(max_frames=2)
    s.send(*(FrameCaptured(f"f{i}", i * 8000) for i in range(8)))  # every 0.5 s, up to 3.5 s
    probe = s.segment(40000, 56000)
    prompt = one(s.log, StartGeneration).prompt
    assert probe and prompt.modality == "video"
    assert prompt.frames == ("f3", "f7")  # window [24000, 56000], spread evenly, newest last


def test_session_update_and_chunker_injection() -> None:
    from duplex.sentences import SentenceChunker

    ctl = DuplexController(
        ControllerSettings(state_tokens=ST), session_id="u", chunker_factory=SentenceChunker
    )
    s = Session(ctl)
    assert s.send(SessionUpdated(history_turns=1, instructions="Speak French.")) == []
    request = s.segment()
    assert one(s.log, StartGeneration).prompt.instructions == "Speak French."
    speaks = only(s.send(TokenDelta(request, (QUERY,), "☞Pi is 3.14, roughly. Yes.")), Speak)
    assert [sp.text for sp in speaks] == ["Pi is 3.14,", "roughly."]  # its first chunk may end at a comma
    s.send(SessionUpdated(instructions=""))
    assert s.ctl.settings.instructions is None and s.ctl.settings.history_turns == 1


def test_session_update_turning_interrupts_off_resumes() -> None:
    s = Session()
    _, response, _ = s.speaking()
    s.send(SpeechStarted(20000), PlaybackPosition(response, 0))
    actions = s.send(SessionUpdated(interrupt_response=False))
    assert kinds(actions)[0] == "ResumeOutput" and only(actions, EmitAudio)


def test_history_is_bounded() -> None:
    s = Session(history_turns=2)
    for text in ("One.", "Two.", "Three."):
        s.answer(text)
    assert [t.assistant for t in s.ctl.history.turns()] == ["☞Two.", "☞Three."]
    request = s.segment()
    assert [t.assistant for t in one(s.log[-1:], StartGeneration).prompt.history] == ["☞Two.", "☞Three."]
    assert request


def test_ids_are_deterministic() -> None:
    s = Session()
    request, response = s.answer()
    assert (request, response) == ("t-req-1", "t-resp-1")
    assert s.answer() == ("t-req-2", "t-resp-2")


def test_malformed_events_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        SpeechStarted(-1)
    with pytest.raises(ValueError, match="end_sample"):
        SpeechEnded(10, 5, None)
    with pytest.raises(ValueError, match="reason"):
        GenerationEnded("r", "finished")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="token_ids"):
        TokenDelta("r", [1], "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a duplex event"):
        DuplexController().handle(Event())
    with pytest.raises(ValueError, match="engines"):
        ControllerSettings(engines=3)


# --- pieces -------------------------------------------------------------------------------------


def test_simple_chunker() -> None:
    chunker = SimpleChunker()
    assert chunker.push("Hi.") == []  # the next character decides ("3." may become "3.14")
    assert chunker.push(" How are you?\nFine") == ["Hi.", "How are you?"]
    assert chunker.push(" 3.14 ok") == []  # no whitespace after the dot: not a sentence end
    assert chunker.flush() == ["Fine 3.14 ok"]
    assert chunker.push("你好。再见") == ["你好。"]


def test_played_text_and_history() -> None:
    text = "Hello there. Second sentence here."
    sentences = [
        SpokenSentence("Hello there.", 12, 0, 100),
        SpokenSentence("Second sentence here.", 34, 100, 200),
    ]
    assert played_text(text, sentences, 0) == ""
    assert played_text(text, sentences, 50) == "Hello"
    assert played_text(text, sentences, 100) == "Hello there."
    assert played_text(text, sentences, 199) == "Hello there. Second sentence"
    assert played_text(text, sentences, 10_000) == text
    unfinished = [sentences[0], SpokenSentence("Second sentence here.", 34, 100, None)]
    assert played_text(text, unfinished, 150) == "Hello there."  # unknown length: claim nothing
    assert (
        played_text(
            "你好。今天天气很好。",
            [SpokenSentence("你好。", 3, 0, 30), SpokenSentence("今天天气很好。", 10, 30, 100)],
            60,
        )
        == "你好。今天天"
    )
    history = History(1)
    history.add("r1", (InputText("a"),), "☞", "x", has_audio=False)
    history.add("r2", (InputText("b"),), "☞", text, tuple(sentences), has_audio=True, played_samples=50)
    assert history.turns() == (HistoryTurn((InputText("b"),), "☞Hello"),)
    assert "r1" not in history and history.truncate("r1", 5) is None
