"""GPU latency estimate for VITA-1.5 at its real sizes, with random weights: no checkpoint, no vLLM.

Runs on any CUDA machine with PyTorch and transformers (numpy optional):

    python bench/gpu_estimate.py                    # full size, bf16 (~16 GiB of GPU memory)
    python bench/gpu_estimate.py --device cpu --tiny --repeats 2   # smoke run (seconds)

Builds InternViT-300M + mlp2x_gelu projector and the whale audio encoder + CNN adapter from
``models/towers.py`` (pure torch) and a Qwen2.5-7B-shaped ``Qwen2ForCausalLM`` (sdpa attention),
directly on the device in bf16, then times per stage (p50 and min over ``--repeats`` after
``--warmup`` runs, ``torch.cuda.synchronize`` + ``perf_counter``):

- audio encode of 3 s of speech (298 fbank frames → 37 tokens), including the host→device copy;
- vision encode of 4 frames at 448² (4 × 256 tokens), and of one frame;
- prefill of a typical duplex prompt (system + history + 4 frames + the speech turn), ending with the
  first generated token (the state token) on the host; also with system + history already in the KV
  cache, as vLLM's prefix caching would have it;
- the next ``--decode-tokens`` decode steps (after the state token: the first words), each ending with
  its token on the host;

and derives "end of speech → first token". Assumption stated in the table: frames are encoded as they
arrive during speech, so vision is off the critical path; the sum with vision at the end is shown too.

The LM runs in HF eager mode (no CUDA graphs, no paged attention, no fused kernels): prefill does the
same matrix work as vLLM's, while decode steps, dominated by kernel launches, are an upper bound for it. The 80-bin fbank comes from ``models.audio_features``
(kaldi-native-fbank) when importable; otherwise a random tensor of the same shape is used, and the
table says so. Sizes come from ``models.config.published_config("vita15")`` when that imports (it
needs transformers 5); otherwise from the copy below (tests check the two agree).

The vita voice (VITA-1.5's speech decoder + TiCodec, ``models/vita_tts/reference.py``) gets its own rows: the
NAR + AR prompt pass of a 12-token first sentence, one AR step, TiCodec on the first 30-token window, and their
sum to the first audio. Its real sizes are an assumption stated in the header (``VOICE_DECODER``,
``VOICE_CODEC``: the published Freeze-Omni decoder, which VITA-1.5's is). ``--voice-only`` times just these
(real size fits a small CPU box: ~0.5 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# models.towers imports only torch (and models.errors): safe on a bare CUDA box.
from models.towers import (
    AudioProjector,
    InternVisionModel,
    VisionProjector,
    WhaleAudioEncoder,
    audio_output_lengths,
    encode_audio,
    encode_images,
)

SAMPLE_RATE = 16000
WINDOW_SAMPLES, SHIFT_SAMPLES = 400, 160  # Kaldi fbank, 25 ms / 10 ms at 16 kHz, snip_edges
NUM_MEL_BINS = 80
# Chat-template tokens around the user turn: "<|im_start|>user\n" before the media, "\n" after the
# frames, "<|im_end|>\n<|im_start|>assistant\n" at the end (Qwen2.5 template, models/prompts.py).
USER_HEAD_TOKENS, FRAMES_SEP_TOKENS, ASSISTANT_HEAD_TOKENS = 3, 1, 5
TEXT_VOCAB_LIMIT = 151643  # Qwen2.5 BPE ranks: prompt text ids are drawn below this


@dataclass(frozen=True)
class Sizes:
    """Every size the estimate depends on (VITA-1.5 unless ``tiny``)."""

    vit_hidden: int = 1024
    vit_intermediate: int = 4096
    vit_layers: int = 24
    vit_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    vit_layer_norm_eps: float = 1e-6
    downsample_ratio: float = 0.5
    audio_input_dim: int = 80
    audio_hidden: int = 1024
    audio_layers: int = 24
    audio_heads: int = 16
    audio_intermediate: int = 4096
    audio_max_position: int = 5000
    adapter_hidden: int = 2048
    adapter_kernel: int = 5
    text: dict = field(
        default_factory=lambda: {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        }
    )
    source: str = "built-in copy of VITA-1.5 sizes"

    @property
    def tokens_per_frame(self) -> int:
        grid = self.image_size // self.patch_size
        return int(grid * grid * self.downsample_ratio**2)

    @property
    def llm_hidden(self) -> int:
        return int(self.text["hidden_size"])


TEXT_KEYS = tuple(Sizes().text)

TINY = replace(
    Sizes(),
    vit_hidden=64,
    vit_intermediate=128,
    vit_layers=2,
    vit_heads=4,
    audio_hidden=64,
    audio_layers=2,
    audio_heads=4,
    audio_intermediate=128,
    adapter_hidden=128,
    text={
        "vocab_size": 2048,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    source="--tiny (real input shapes, tiny widths and depths)",
)


def sizes_from_config(config: object) -> Sizes:
    """Sizes of a ``models.config.VitaConfig``."""
    v, a, t = config.vision_config, config.audio_config, config.get_text_config()  # type: ignore[attr-defined]
    text = {}
    for key in TEXT_KEYS:
        value = getattr(t, key, None)
        if value is None and key == "rope_theta":  # transformers 5 keeps it in rope_parameters
            value = (getattr(t, "rope_parameters", None) or {}).get("rope_theta")
        text[key] = value
    return Sizes(
        vit_hidden=v.hidden_size,
        vit_intermediate=v.intermediate_size,
        vit_layers=v.num_hidden_layers,
        vit_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        vit_layer_norm_eps=v.layer_norm_eps,
        downsample_ratio=config.downsample_ratio,  # type: ignore[attr-defined]
        audio_input_dim=a.input_dim,
        audio_hidden=a.hidden_size,
        audio_layers=a.num_hidden_layers,
        audio_heads=a.num_attention_heads,
        audio_intermediate=a.intermediate_size,
        audio_max_position=a.max_position,
        adapter_hidden=a.adapter_hidden_size,
        adapter_kernel=a.adapter_kernel_size,
        text=text,
        source='models.config.published_config("vita15")',
    )


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:100]


def full_sizes() -> Sizes:
    """VITA-1.5 sizes from the repo's published config, or the built-in copy where it cannot import."""
    try:
        from models.config import published_config

        return sizes_from_config(published_config("vita15"))
    except (ImportError, AttributeError, TypeError, ValueError) as exc:  # e.g. transformers 4.x
        return replace(Sizes(), source=f"built-in copy (models.config not importable: {_why(exc)})")


# ----------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@dataclass
class Components:
    vision: InternVisionModel
    vision_projector: VisionProjector
    audio: WhaleAudioEncoder
    audio_projector: AudioProjector
    lm: nn.Module

    def param_counts(self) -> dict[str, int]:
        return {
            "vision tower (InternViT)": _numel(self.vision),
            "vision projector (mlp2x_gelu)": _numel(self.vision_projector),
            "audio encoder (whale)": _numel(self.audio),
            "audio adapter": _numel(self.audio_projector),
            "LM (Qwen2, incl. embed + lm_head)": _numel(self.lm),
        }


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_lm(text: dict) -> nn.Module:
    """A random ``Qwen2ForCausalLM``, created wherever the current device/dtype context says."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**text, attn_implementation="sdpa")
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()


def build(sizes: Sizes, device: str | torch.device, dtype: torch.dtype) -> Components:
    """All components created directly on ``device`` in ``dtype`` (no CPU init, no fp32 copy)."""
    with torch.device(device), default_dtype(dtype):
        vision = InternVisionModel(
            hidden_size=sizes.vit_hidden,
            intermediate_size=sizes.vit_intermediate,
            num_hidden_layers=sizes.vit_layers,
            num_attention_heads=sizes.vit_heads,
            image_size=sizes.image_size,
            patch_size=sizes.patch_size,
            layer_norm_eps=sizes.vit_layer_norm_eps,
        )
        vision_projector = VisionProjector(
            int(sizes.vit_hidden / sizes.downsample_ratio**2), sizes.llm_hidden
        )
        audio = WhaleAudioEncoder(
            input_dim=sizes.audio_input_dim,
            hidden_size=sizes.audio_hidden,
            num_hidden_layers=sizes.audio_layers,
            num_attention_heads=sizes.audio_heads,
            intermediate_size=sizes.audio_intermediate,
            max_position=sizes.audio_max_position,
        )
        audio_projector = AudioProjector(
            encoder_dim=sizes.audio_hidden,
            llm_dim=sizes.llm_hidden,
            hidden=sizes.adapter_hidden,
            kernel_size=sizes.adapter_kernel,
        )
        lm = build_lm(sizes.text)
    parts = Components(vision.eval(), vision_projector.eval(), audio.eval(), audio_projector.eval(), lm)
    return parts


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def num_fbank_frames(num_samples: int) -> int:
    return 0 if num_samples < WINDOW_SAMPLES else 1 + (num_samples - WINDOW_SAMPLES) // SHIFT_SAMPLES


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    """A deterministic voiced-ish 16 kHz signal in [-1, 1] (harmonics of a gliding pitch + noise)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    pitch = 120 + 30 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / SAMPLE_RATE
    wave = sum(torch.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t))
    wave = 0.3 * wave / wave.abs().max() + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
    return wave.float()


def fbank_extractor() -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """The repo's Kaldi fbank + CMVN (identity CMVN: the weights are random anyway), if importable."""
    try:
        from models.audio_features import AudioFeatureExtractor
    except (ImportError, OSError) as exc:  # kaldi-native-fbank / soundfile (libsndfile) / soxr missing
        return (
            None,
            f"random (T, 80) fbank stand-in: models.audio_features not importable ({_why(exc)})",
        )
    extractor = AudioFeatureExtractor([0.0] * NUM_MEL_BINS, [1.0] * NUM_MEL_BINS)

    def run(wave: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(extractor(wave.numpy()))

    return run, "real Kaldi fbank (kaldi-native-fbank, identity CMVN)"


@dataclass(frozen=True)
class Prompt:
    """Token layout of one duplex prompt: system, history, then the user turn with frames and speech."""

    system: int
    history: int
    frames: int
    tokens_per_frame: int
    audio: int

    @property
    def prefix(self) -> int:
        """System + history: what prefix caching keeps from the previous turn."""
        return self.system + self.history

    @property
    def user_turn(self) -> int:
        return (
            USER_HEAD_TOKENS
            + self.frames * self.tokens_per_frame
            + (FRAMES_SEP_TOKENS if self.frames else 0)
            + self.audio
            + ASSISTANT_HEAD_TOKENS
        )

    @property
    def total(self) -> int:
        return self.prefix + self.user_turn

    def input_ids(self, vocab: int, image_id: int, audio_id: int, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        high = min(vocab - 2, TEXT_VOCAB_LIMIT)

        def text(n: int) -> torch.Tensor:
            return torch.randint(0, high, (n,), generator=gen)

        parts = [
            text(self.prefix + USER_HEAD_TOKENS),
            torch.full((self.frames * self.tokens_per_frame,), image_id),
        ]
        if self.frames:
            parts.append(text(FRAMES_SEP_TOKENS))
        parts += [torch.full((self.audio,), audio_id), text(ASSISTANT_HEAD_TOKENS)]
        ids = torch.cat(parts)[None]
        assert ids.shape[1] == self.total
        return ids


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------


def cache_length(cache: object) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # type: ignore[index]  # legacy tuple cache


def encode_speech(
    parts: Components, features: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return encode_audio(parts.audio, parts.audio_projector, features.to(device=device, dtype=dtype))


def encode_frames(
    parts: Components, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype, downsample_ratio: float
) -> torch.Tensor:
    tokens = encode_images(
        parts.vision, parts.vision_projector, pixels.to(device=device, dtype=dtype), downsample_ratio
    )
    return tokens.reshape(-1, tokens.shape[-1])


def prefill(
    lm: nn.Module, input_ids: torch.Tensor, media: dict[int, torch.Tensor], cache: object = None
) -> tuple[int, object]:
    """Embed, splice media rows over their placeholders, run the LM; returns (first token id, cache)."""
    embeds = lm.get_input_embeddings()(input_ids)
    for token_id, rows in media.items():
        mask = input_ids == token_id
        if int(mask.sum()) != rows.shape[0]:
            raise RuntimeError(
                f"{int(mask.sum())} placeholders for id {token_id} but {rows.shape[0]} embeddings"
            )
        embeds = embeds.masked_scatter(mask[..., None], rows.to(embeds.dtype))
    out = lm.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    logits = lm.lm_head(out.last_hidden_state[:, -1:])  # as vLLM: logits for the last position only
    return int(logits.argmax(-1)), out.past_key_values


def decode_step(lm: nn.Module, token: int, cache: object, device: torch.device) -> tuple[int, object]:
    """One greedy step; returns (next token id, cache) (older transformers return a new legacy tuple)."""
    ids = torch.tensor([[token]], device=device)
    out = lm.model(input_ids=ids, past_key_values=cache, use_cache=True)
    return int(lm.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)), out.past_key_values


class Timer:
    """Wall time of a block, synchronising the device before and after."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.samples: dict[str, list[float]] = {}
        self.recording = True

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        if self.recording:
            self.samples.setdefault(name, []).append((time.perf_counter() - start) * 1e3)


@dataclass
class Run:
    sizes: Sizes
    prompt: Prompt
    seconds: float
    frames: int
    audio_frames: int
    decode_tokens: int
    fbank_note: str
    samples: dict[str, list[float]]
    prefill_len: int
    cached_prefix_len: int
    cached_total_len: int
    decoded_len: int


def run_stages(
    parts: Components,
    sizes: Sizes,
    device: torch.device,
    dtype: torch.dtype,
    *,
    seconds: float,
    frames: int,
    system_tokens: int,
    history_tokens: int,
    decode_tokens: int,
    repeats: int,
    warmup: int,
) -> Run:
    wave = speech_like(seconds)
    fbank, fbank_note = fbank_extractor()
    audio_frames = num_fbank_frames(wave.shape[0])
    if fbank is None:
        features = torch.randn(
            audio_frames, sizes.audio_input_dim, generator=torch.Generator().manual_seed(1)
        )
    else:
        features = fbank(wave)
    assert features.shape == (audio_frames, sizes.audio_input_dim), features.shape
    n_audio = int(audio_output_lengths(audio_frames))
    pixels = torch.randn(
        frames, 3, sizes.image_size, sizes.image_size, generator=torch.Generator().manual_seed(2)
    )
    prompt = Prompt(system_tokens, history_tokens, frames, sizes.tokens_per_frame, n_audio)
    vocab = int(sizes.text["vocab_size"])
    image_id, audio_id = vocab - 2, vocab - 1  # as published_config: rows past the tokenizer
    ids = prompt.input_ids(vocab, image_id, audio_id).to(device)
    prefix_ids, turn_ids = ids[:, : prompt.prefix], ids[:, prompt.prefix :]

    timer = Timer(device)
    lengths: dict[str, int] = {}
    for i in range(warmup + repeats):
        timer.recording = i >= warmup
        if fbank is not None:
            with timer("fbank"):
                fbank(wave)
        with timer("audio"):
            audio_tokens = encode_speech(parts, features, device, dtype)
        with timer("vision4"):
            image_tokens = encode_frames(parts, pixels, device, dtype, sizes.downsample_ratio)
        with timer("vision1"):
            encode_frames(parts, pixels[:1], device, dtype, sizes.downsample_ratio)
        media = {image_id: image_tokens, audio_id: audio_tokens}
        with timer("prefill"):
            token, cache = prefill(parts.lm, ids, media)
        lengths["prefill"] = cache_length(cache)
        for step in range(decode_tokens):
            with timer(f"decode{step}"):
                token, cache = decode_step(parts.lm, token, cache, device)
        lengths["decoded"] = cache_length(cache)
        del cache
        # Prefix caching: system + history already in the KV cache from the previous turn (untimed).
        _, cache = prefill(parts.lm, prefix_ids, {})
        lengths["prefix"] = cache_length(cache)
        with timer("prefill_cached"):
            _, cache = prefill(parts.lm, turn_ids, media, cache)
        lengths["cached_total"] = cache_length(cache)
        del cache
    return Run(
        sizes=sizes,
        prompt=prompt,
        seconds=seconds,
        frames=frames,
        audio_frames=audio_frames,
        decode_tokens=decode_tokens,
        fbank_note=fbank_note,
        samples=timer.samples,
        prefill_len=lengths["prefill"],
        cached_prefix_len=lengths["prefix"],
        cached_total_len=lengths["cached_total"],
        decoded_len=lengths["decoded"],
    )


# ----------------------------------------------------------------------------------------------------
# The vita voice: speech decoder (NAR + AR) and TiCodec, at real size
# ----------------------------------------------------------------------------------------------------

# ASSUMPTION: VITA-1.5's vita_tts_ckpt/ is not read here. Its sizes are taken to be those of the published
# Freeze-Omni checkpoint's decoder/model.json and codec/model.json, whose speech decoder and TiCodec VITA-1.5's
# own is (same code, vita/model/vita_tts/): input vectors of 896 = the 3584-d LLM embedding row cut in 4,
# width 896 with 14 heads of 64, FFN 4864, 4 AR layers + 2 NAR (pre_nn) layers, 1024 codec codes (+4 specials),
# RoPE over 2048 positions; TiCodec 512 -> 32 channels over upsampling 8*5*5*3 = 600 samples per token at 24 kHz.
VOICE_DECODER = {"idim": 896, "odim": 1024, "hidden_size": 896, "intermediate_size": 4864, "num_layers": 4,
                 "num_heads": 14, "output_dim": 896}
VOICE_CODEC = {
    "upsample_rates": (8, 5, 5, 3), "upsample_kernel_sizes": (16, 11, 11, 5), "upsample_initial_channel": 512,
    "resblock": "1", "resblock_kernel_sizes": (3, 7, 11), "resblock_dilation_sizes": ((1, 3, 5),) * 3,
    "n_codes": 1024, "n_code_groups": 1, "residul_layer": 1, "global_code_num": 8,
    "global_tokens": (473, 975, 419, 219, 565, 121, 550, 616),
}
VOICE_SOURCE = "assumed = Freeze-Omni's published decoder/codec model.json (VITA-1.5 reuses that decoder)"
VOICE_TEXT_TOKENS = 12  # a first sentence of about eight words
FIRST_WINDOW = 30  # upstream's first audio chunk: 20 kept + 10 padding codec tokens (0.5 s of speech)
VOICE_STAGES = ("voice_prompt", "voice_step", "voice_codec")


@dataclass
class Voice:
    decoder: object  # models.vita_tts.reference.ReferenceDecoder
    codec: object  # models.vita_tts.reference.ReferenceCodec
    source: str

    def param_counts(self) -> dict[str, int]:
        from models.vita_tts.reference import codec_shapes, decoder_shapes

        return {
            "speech decoder (NAR + AR + head)": sum(math.prod(s) for s in decoder_shapes(self.decoder.cfg).values()),
            "TiCodec decoder side": sum(math.prod(s) for s in codec_shapes(self.codec.cfg).values()),
        }

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """What vLLM's paged KV cache holds per codec token: K and V of every AR layer."""
        cfg = self.decoder.cfg
        return 2 * cfg.num_layers * cfg.hidden_size * torch.tensor([], dtype=dtype).element_size()


def build_voice(tiny: bool, device: torch.device, dtype: torch.dtype) -> Voice:
    """The pure-torch transcription of upstream's speech decoder and TiCodec (models/vita_tts/reference.py,
    the math the served engine is checked against) with random weights (eos banned, so a sentence never ends
    early), on ``device`` in ``dtype``."""
    from models.vita_tts.config import CodecConfig, DecoderConfig
    from models.vita_tts.reference import ReferenceCodec, ReferenceDecoder
    from models.vita_tts.tiny import (
        random_codec_weights,
        random_decoder_weights,
        tiny_codec_config,
        tiny_decoder_config,
    )

    if tiny:
        dcfg, ccfg, source = tiny_decoder_config(), tiny_codec_config(), "--tiny (models/vita_tts/tiny.py)"
    else:
        dcfg, ccfg, source = DecoderConfig(**VOICE_DECODER), CodecConfig(**VOICE_CODEC), VOICE_SOURCE
    dw = {k: v.to(device=device, dtype=dtype) for k, v in random_decoder_weights(dcfg).items()}
    cw = {k: v.to(device=device, dtype=dtype) for k, v in random_codec_weights(ccfg).items()}
    return Voice(ReferenceDecoder(dcfg, dw, dtype), ReferenceCodec(ccfg, cw, dtype), source)


@dataclass
class VoiceRun:
    vectors: int
    samples: dict[str, list[float]]
    window_samples: int


def run_voice(
    voice: Voice, llm_hidden: int, device: torch.device, dtype: torch.dtype, *, repeats: int, warmup: int
) -> VoiceRun:
    """One first sentence: the NAR + AR prompt pass (what the server runs in torch before vLLM), the AR steps
    to the first window (each ending with its token on the host), and TiCodec on that window (to the host)."""
    decoder, codec = voice.decoder, voice.codec
    cfg = decoder.cfg  # type: ignore[attr-defined]
    n = VOICE_TEXT_TOKENS * max(1, llm_hidden // cfg.idim)
    vectors = torch.randn(n, cfg.idim, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    timer = Timer(device)
    window = 0
    with torch.device(device):  # the reference makes its position/token tensors on the default device
        for i in range(warmup + repeats):
            timer.recording = i >= warmup
            with timer("voice_prompt"):
                decoder.prompt_layer_inputs(vectors)  # type: ignore[attr-defined]
            steps = decoder.generate(vectors, max_tokens=FIRST_WINDOW)  # type: ignore[attr-defined]
            tokens = [next(steps)]  # its prompt pass is the row above
            for _ in range(FIRST_WINDOW - 1):
                with timer("voice_step"):
                    tokens.append(next(steps))
            steps.close()
            with timer("voice_codec"):
                audio = codec.decode(torch.tensor([tokens])).float().cpu()  # type: ignore[attr-defined]
            window = audio.shape[-1]
    return VoiceRun(n, timer.samples, window)


def voice_rows(run: VoiceRun) -> list[tuple[str, str, float, float]]:
    stat = {k: (_p50(v), min(v)) for k, v in run.samples.items()}
    steps = stat["voice_step"]
    first = tuple(stat["voice_prompt"][j] + FIRST_WINDOW * steps[j] + stat["voice_codec"][j] for j in (0, 1))
    return [
        ("voice: NAR + AR prompt pass, 1 sentence", f"{VOICE_TEXT_TOKENS} text tok -> {run.vectors} vec",
         *stat["voice_prompt"]),
        ("voice: AR step (per codec token)", "1 codec tok", *steps),
        (f"voice: TiCodec, first window ({FIRST_WINDOW} tok)", f"{run.window_samples} samples",
         *stat["voice_codec"]),
        ("= voice: sentence -> first audio", f"prompt + {FIRST_WINDOW} steps + codec", *first),
    ]


def voice_header(voice: Voice, run: VoiceRun, dtype: torch.dtype) -> list[str]:
    cfg = voice.decoder.cfg  # type: ignore[attr-defined]
    kv = voice.kv_bytes_per_token(dtype)
    lines = [f"# params {label}: {_millions(n)}" for label, n in voice.param_counts().items()]
    lines += [
        (f"# voice: width {cfg.hidden_size}, {cfg.num_layers} AR + {cfg.num_pre_nn_layers} NAR layers, "
         f"{cfg.num_heads} heads, FFN {cfg.intermediate_size}, {cfg.odim} codes; sizes: {voice.source}"),
        (f"# voice: KV cache {kv / 1024:.1f} KiB per codec token in {str(dtype).removeprefix('torch.')}, "
         f"{kv * cfg.max_position_embeddings / 2**20:.1f} MiB for a full {cfg.max_position_embeddings}-position "
         "sentence; the AR steps here are eager torch, an upper bound for vLLM's (which batches sessions)"),
    ]
    return lines


# ----------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------


def _p50(values: list[float]) -> float:
    return statistics.median(values)


def table(run: Run) -> list[tuple[str, str, float, float]]:
    """(stage, tokens, p50 ms, min ms) rows; derived rows add p50s and mins of their parts."""
    s, p = run.samples, run.prompt
    rows: list[tuple[str, str, float, float]] = []
    stat = {k: (_p50(v), min(v)) for k, v in s.items()}
    steps = [s[f"decode{i}"] for i in range(run.decode_tokens)]
    per_step = [x for step in steps for x in step]
    totals = [sum(xs) for xs in zip(*steps, strict=True)] if steps else []
    if "fbank" in stat:
        rows.append(
            (f"audio features, CPU fbank ({run.seconds:g} s)", f"{run.audio_frames} frames", *stat["fbank"])
        )
    rows += [
        ("audio encode (whale + adapter)", f"{run.audio_frames} fr -> {p.audio} tok", *stat["audio"]),
        (
            f"vision encode, {run.frames} frames (ViT + projector)",
            f"{run.frames} x {p.tokens_per_frame} tok",
            *stat["vision4"],
        ),
        ("vision encode, 1 frame", f"{p.tokens_per_frame} tok", *stat["vision1"]),
        ("prefill, full prompt -> 1st token", f"{run.prefill_len} tok", *stat["prefill"]),
        (
            "prefill, sys+history cached -> 1st token",
            f"{run.cached_total_len - run.cached_prefix_len} on {run.cached_prefix_len} cached",
            *stat["prefill_cached"],
        ),
    ]
    if run.decode_tokens:
        rows.append(("decode step (per token)", "1 tok", _p50(per_step), min(per_step)))
        rows.append(
            (
                f"decode {run.decode_tokens} tokens (total)",
                f"{run.decode_tokens} tok",
                _p50(totals),
                min(totals),
            )
        )

    def total(*names: str, extra: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
        return sum(stat[n][0] for n in names) + extra[0], sum(stat[n][1] for n in names) + extra[1]

    first_step = (_p50(steps[0]), min(steps[0])) if steps else (0.0, 0.0)
    rows += [
        ("= speech end -> 1st token, vision ahead", "audio + prefill", *total("audio", "prefill")),
        (
            "= speech end -> 1st token, vision at end",
            "audio + vision + prefill",
            *total("audio", "vision4", "prefill"),
        ),
        (
            "= speech end -> 1st token, vision ahead, prefix cached",
            "audio + cached prefill",
            *total("audio", "prefill_cached"),
        ),
    ]
    if steps:
        rows.append(
            (
                "= speech end -> 2nd token (1st word), vision ahead",
                "+ 1 decode step",
                *total("audio", "prefill", extra=first_step),
            )
        )
    return rows


def format_table(rows: list[tuple[str, str, float, float]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "tokens", 0, 0)])
    out = [f"{'stage':<{w0}} | {'tokens':<{w1}} | {'p50 ms':>9} | {'min ms':>9}", "-" * (w0 + w1 + 30)]
    out += [f"{name:<{w0}} | {tok:<{w1}} | {p50:9.2f} | {low:9.2f}" for name, tok, p50, low in rows]
    return "\n".join(out)


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M ({n:,})"


def header(
    run: Run,
    parts: Components,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tiny: bool,
    repeats: int,
    warmup: int,
) -> list[str]:
    """The '#' lines above the table: machine, versions, sizes, inputs, and what the timings include."""
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    p, sizes = run.prompt, run.sizes
    versions = (
        f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}"
    )
    attention = parts.lm.config._attn_implementation
    kv = f"KV after prefill {run.prefill_len}, after decode {run.decoded_len}"
    user_turn = (
        f"{USER_HEAD_TOKENS} head + {run.frames}x{p.tokens_per_frame} image + {FRAMES_SEP_TOKENS} sep + "
        f"{p.audio} audio + {ASSISTANT_HEAD_TOKENS} assistant head"
    )
    lines = [
        f"# VITA-1.5 GPU estimate{' (TINY sizes)' if tiny else ''}: random weights, no vLLM",
        f"# device: {name}; {versions}, python {platform.python_version()}",
        (
            f"# dtype {str(dtype).removeprefix('torch.')}, LM attention {attention}, HF eager (no CUDA graphs); "
            f"sizes: {sizes.source}"
        ),
    ]
    lines += [f"# params {label}: {_millions(n)}" for label, n in parts.param_counts().items()]
    lines += [
        (
            f"# audio: {run.seconds:g} s at 16 kHz -> {run.audio_frames} x {sizes.audio_input_dim} fbank -> "
            f"{p.audio} tokens; features: {run.fbank_note}"
        ),
        (
            f"# vision: {run.frames} frames {sizes.image_size}x{sizes.image_size} -> "
            f"{p.tokens_per_frame} tokens each"
        ),
        (
            f"# prompt: {p.total} tokens = system {p.system} + history {p.history} + "
            f"user turn {p.user_turn} ({user_turn}); {kv}"
        ),
        (
            f"# timing: p50 / min over {repeats} runs after {warmup} warm-up; each stage synchronised, "
            "inputs copied from the host, and ending with its output (prefill/decode: the token id on the host)"
        ),
        (
            "# assumption: frames are encoded as they arrive during speech, so vision is off the critical "
            f"path ('vision ahead'); 'vision at end' adds the {run.frames}-frame encode. '=' rows sum the "
            "p50s (mins) of their parts; the CPU fbank is not in the sums (it can run streaming)"
        ),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="tiny widths/depths, real input shapes: a CPU smoke run in seconds",
    )
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per stage (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    ap.add_argument("--audio-seconds", type=float, default=3.0, help="speech length (default 3.0 s)")
    ap.add_argument(
        "--frames", type=int, default=4, help="video frames in the user turn, 448² each (default 4)"
    )
    ap.add_argument(
        "--system-tokens", type=int, default=100, help="system prompt tokens incl. template (default 100)"
    )
    ap.add_argument("--history-tokens", type=int, default=300, help="earlier turns' tokens (default 300)")
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        help="whole prompt length instead: history = this - system - user turn (overrides --history-tokens)",
    )
    ap.add_argument(
        "--decode-tokens", type=int, default=8, help="decode steps after the first token (default 8)"
    )
    ap.add_argument(
        "--voice-only", action="store_true",
        help="only the vita voice's rows (speech decoder + TiCodec): runs at real size on a small CPU box too",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.frames < 1 or args.warmup < 0 or args.decode_tokens < 0:
        ap.error("--repeats and --frames must be >= 1; --warmup and --decode-tokens >= 0")
    if args.system_tokens < 1 or args.history_tokens < 0:
        ap.error("--system-tokens must be >= 1 and --history-tokens >= 0")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"error: CUDA is not available (torch {torch.__version__}, cuda {torch.version.cuda}); "
            "run this on a CUDA machine, or pass --device cpu (with --tiny for a smoke run)",
            file=sys.stderr,
        )
        return 2
    if device.type not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda[:N] or cpu; got {args.device}")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    sizes = TINY if args.tiny else full_sizes()
    if args.prompt_tokens is not None:
        n_audio = int(audio_output_lengths(num_fbank_frames(int(args.audio_seconds * SAMPLE_RATE))))
        turn = Prompt(args.system_tokens, 0, args.frames, sizes.tokens_per_frame, n_audio).user_turn
        args.history_tokens = args.prompt_tokens - args.system_tokens - turn
        if args.history_tokens < 0:
            ap.error(f"--prompt-tokens {args.prompt_tokens} < system {args.system_tokens} + user turn {turn}")
    if device.type == "cpu" and not args.tiny and not args.voice_only:
        print("warning: full size on CPU needs ~30 GiB and minutes per stage", file=sys.stderr)

    started = time.perf_counter()
    torch.manual_seed(0)
    if args.voice_only:
        return _voice_only(args, sizes, device, dtype, started)
    parts = build(sizes, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        weights = f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB"
        torch.cuda.reset_peak_memory_stats(device)
    built_s = time.perf_counter() - started
    with torch.inference_mode():
        run = run_stages(
            parts,
            sizes,
            device,
            dtype,
            seconds=args.audio_seconds,
            frames=args.frames,
            system_tokens=args.system_tokens,
            history_tokens=args.history_tokens,
            decode_tokens=args.decode_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
        )
    if run.prefill_len != run.prompt.total or run.cached_total_len != run.prompt.total:
        raise RuntimeError(
            f"KV cache holds {run.prefill_len}/{run.cached_total_len} tokens, prompt has {run.prompt.total}"
        )
    if run.decoded_len != run.prompt.total + run.decode_tokens:
        raise RuntimeError(
            f"KV cache after decode holds {run.decoded_len}, expected {run.prompt.total + run.decode_tokens}"
        )

    voice = build_voice(args.tiny, device, dtype)
    with torch.inference_mode():
        vrun = run_voice(voice, sizes.llm_hidden, device, dtype, repeats=args.repeats, warmup=args.warmup)

    for line in header(run, parts, device, dtype, tiny=args.tiny, repeats=args.repeats, warmup=args.warmup):
        print(line)
    for line in voice_header(voice, vrun, dtype):
        print(line)
    print(format_table(table(run) + voice_rows(vrun)))
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (weights {weights})"
    else:
        memory = "n/a (CPU)"
    total_s = time.perf_counter() - started
    print(f"# peak GPU memory: {memory}; build {built_s:.1f} s; total {total_s:.1f} s (after imports)")
    return 0


def _voice_only(args: argparse.Namespace, sizes: Sizes, device: torch.device, dtype: torch.dtype,
                started: float) -> int:
    voice = build_voice(args.tiny, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        weights = f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB"
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        vrun = run_voice(voice, sizes.llm_hidden, device, dtype, repeats=args.repeats, warmup=args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"# vita voice estimate{' (TINY sizes)' if args.tiny else ''}: random weights, no vLLM")
    print(f"# device: {name}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}")
    for line in voice_header(voice, vrun, dtype):
        print(line)
    print(f"# timing: p50 / min over {args.repeats} runs after {args.warmup} warm-up, each stage synchronised")
    print(format_table(voice_rows(vrun)))
    memory = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (weights {weights})"
              if device.type == "cuda" else "n/a (CPU)")
    print(f"# peak GPU memory: {memory}; total {time.perf_counter() - started:.1f} s (after imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
