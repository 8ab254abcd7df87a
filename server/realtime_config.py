"""What a realtime client has configured with `session.update`, as in effect, and the GA session object
that `session.created` / `session.updated` report it with.

Turn detection: `server_vad` and `semantic_vad` both run the server's VAD to cut speech into segments,
and in both VITA's monitor reads its first token on each segment (☞ query, ☟ noise, ☜ text): that state
token is a semantic judgement of whether the user addressed it, so `semantic_vad` needs no other model.
What `semantic_vad` adds is `eagerness`: how long a pause ends a turn (low waits twice the server's
silence, high half of it; medium and auto use it as is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from openai.types.realtime import RealtimeSessionCreateRequest
from openai.types.realtime.realtime_audio_formats import AudioPCM, AudioPCMA, AudioPCMU

from duplex.vad import VadParams

from .settings import ServerSettings
from .wire.audio_codec import AudioFormat
from .wire.client_events import TurnDetection
from .wire.server_events import AudioPCMAnyRate, strict

Modality = Literal["text", "audio"]
_EAGERNESS_SILENCE = {"low": 2.0, "medium": 1.0, "auto": 1.0, "high": 0.5}


@dataclass
class RealtimeConfig:
    model: str
    max_output_tokens: int
    output_modalities: list[Modality]
    vad_defaults: TurnDetection  # the server's server_vad settings, all fields given
    turn_detection: TurnDetection | None  # None: manual turns (commit + response.create)
    input_format: AudioFormat = field(default_factory=AudioFormat)
    output_format: AudioFormat = field(default_factory=AudioFormat)
    voice: str = "vita"
    instructions: str | None = None
    # Input transcription as in effect (GA `audio.input.transcription`): None is off (GA's default).
    transcription: dict[str, str] | None = None

    def update_turn_detection(self, given: TurnDetection) -> TurnDetection:
        """Fields not given keep their value; a change of type starts from that type's defaults."""
        current = self.turn_detection
        if current is not None and current.type == given.type:
            base = current
        elif given.type == "server_vad":
            base = self.vad_defaults
        else:
            base = TurnDetection(type=given.type, eagerness="auto", create_response=True, interrupt_response=True)
        self.turn_detection = base.model_copy(update={k: v for k, v in given.model_dump().items() if v is not None})
        return self.turn_detection

    def vad_params(self, settings: ServerSettings) -> VadParams:
        d = self.turn_detection or self.vad_defaults
        if d.type == "semantic_vad":  # GA's semantic_vad has no VAD knobs: the server's, paced by eagerness
            pause = settings.vad_silence_duration_ms * _EAGERNESS_SILENCE[d.eagerness or "auto"]
            d = self.vad_defaults.model_copy(update={"silence_duration_ms": round(pause)})
        return VadParams(
            threshold=d.threshold if d.threshold is not None else settings.vad_threshold,
            prefix_padding_ms=float(d.prefix_padding_ms if d.prefix_padding_ms is not None
                                    else settings.vad_prefix_padding_ms),
            silence_duration_ms=float(d.silence_duration_ms if d.silence_duration_ms is not None
                                      else settings.vad_silence_duration_ms),
            min_speech_ms=float(settings.vad_min_speech_ms),
            max_speech_ms=settings.max_buffered_audio_s * 1000,
        )

    def ga_session(self) -> RealtimeSessionCreateRequest:
        """The GA session object: exactly what is in effect, nothing GA's schema does not have."""
        return strict(
            RealtimeSessionCreateRequest,
            type="realtime",
            model=self.model,
            instructions=self.instructions or "",
            output_modalities=list(self.output_modalities),
            max_output_tokens=self.max_output_tokens,
            audio={
                "input": {"format": _ga_format(self.input_format), "turn_detection": self._ga_turn_detection(),
                          "transcription": dict(self.transcription) if self.transcription is not None else None},
                "output": {"format": _ga_format(self.output_format), "voice": self.voice},
            },
        )

    def _ga_turn_detection(self) -> dict[str, object] | None:
        d = self.turn_detection
        if d is None:
            return None
        if d.type == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": d.eagerness or "auto",
                    "create_response": d.create_response is not False,
                    "interrupt_response": d.interrupt_response is not False}
        return {"type": "server_vad", "threshold": d.threshold, "prefix_padding_ms": d.prefix_padding_ms,
                "silence_duration_ms": d.silence_duration_ms, "create_response": d.create_response is not False,
                "interrupt_response": d.interrupt_response is not False}


def _ga_format(fmt: AudioFormat) -> AudioPCM | AudioPCMU | AudioPCMA:
    if fmt.encoding == "pcmu":
        return AudioPCMU(type="audio/pcmu")
    if fmt.encoding == "pcma":
        return AudioPCMA(type="audio/pcma")
    if fmt.rate == 24000:
        return AudioPCM(type="audio/pcm", rate=24000)
    return AudioPCMAnyRate(type="audio/pcm", rate=fmt.rate)  # type: ignore[arg-type]
