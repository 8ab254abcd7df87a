"""The vita voice without vLLM: whole-response synthesis with the pure-torch reference (for
`vita-duplex generate --speech-out`) and a checkpoint summary (for `vita-duplex inspect`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TTSConfigError, find_tts_dir, open_tts_checkpoint
from .engine import TextEmbedder, iter_windows, prepare_text
from .reference import ReferenceCodec, ReferenceDecoder, codec_shapes, decoder_shapes
from .streaming import FIRST_SENTENCE, LATER_SENTENCE, SentenceStream
from .weights import TTSWeightsError, map_codec_names, map_decoder_names, safe_load


def synthesize(
    model_dir: str | Path, sentences: list[str], seed: int = 0, max_tokens: int = 1000, tokenizer: Any = None
) -> tuple[np.ndarray, int]:
    """Speak one response's sentences with the checkpoint's voice, as the streaming path would (the first
    sentence gets the first-sentence rules). Returns float32 mono audio and its rate (24000). `tokenizer`: the
    LLM's (None: loaded from `model_dir`)."""
    ckpt = open_tts_checkpoint(model_dir)
    decoder, codec = ReferenceDecoder.load(ckpt), ReferenceCodec.load(ckpt)
    embedder = TextEmbedder(model_dir, ckpt.decoder.idim, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    pieces: list[np.ndarray] = []
    for i, sentence in enumerate(sentences):
        text = prepare_text(sentence, first=i == 0)
        vectors = embedder.vectors(text) if text else torch.zeros(0, ckpt.decoder.idim)
        if vectors.shape[0] == 0:
            continue
        params = FIRST_SENTENCE if i == 0 else LATER_SENTENCE
        tokens = list(decoder.generate(vectors, max_tokens=max_tokens, generator=generator))
        stream = SentenceStream(params)
        for window in iter_windows(tokens, params):
            piece = stream.decoded(window, codec.decode(torch.tensor([window.tokens]))[0, 0])
            if piece is not None:
                pieces.append(piece.numpy())
    audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    return audio, ckpt.codec.sampling_rate


@dataclass
class VoiceReport:
    """What `inspect` says about a checkpoint's voice: `present` (a vita_tts_ckpt/ was found), report lines,
    and problems (files that would fail at serve time: unreadable, not plain tensors, missing or misshapen
    tensors)."""

    present: bool
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_voice(model_dir: str | Path) -> VoiceReport:
    """Open the voice as the server would (configs, both `final.pt` through `torch.load(weights_only=True)`),
    and check every tensor inference reads against the shapes its config implies. Never raises."""
    root = find_tts_dir(model_dir)
    if root is None:
        none = "speech decoder: none (no vita_tts_ckpt/): speech out uses espeak or the configured TTS backend"
        return VoiceReport(False, [none])
    report = VoiceReport(True, [f"speech decoder: {root}"])
    try:
        ckpt = open_tts_checkpoint(root)
        d, c = ckpt.decoder, ckpt.codec
        dec = map_decoder_names(safe_load(ckpt.decoder_weights))
        cod = map_codec_names(safe_load(ckpt.codec_weights))
    except (TTSConfigError, TTSWeightsError) as exc:
        report.problems.append(f"speech decoder {root}: unusable: {exc}")
        return report
    dec_params = sum(t.numel() for t in dec.values()) / 1e6
    codec_params = sum(t.numel() for t in cod.values()) / 1e6
    report.lines.append(
        f"  decoder: width {d.hidden_size}, {d.num_layers} AR + {d.num_pre_nn_layers} NAR layers, {d.num_heads} "
        f"heads, FFN {d.intermediate_size}, {d.odim} codes + 4 specials; {dec_params:.1f} M parameters"
    )
    report.lines.append(
        f"  codec: TiCodec, {c.samples_per_token} samples per token at {c.sampling_rate} Hz, {c.n_codes} codes, "
        f"voice = global tokens {list(c.global_tokens)}; {codec_params:.1f} M parameters (decoder side)"
    )
    for name, path, found, want in (
        ("decoder/final.pt", ckpt.decoder_weights, dec, decoder_shapes(d)),
        ("codec/final.pt", ckpt.codec_weights, cod, codec_shapes(c)),
    ):
        missing = [k for k in want if k not in found]
        wrong = [k for k in want if k in found and tuple(found[k].shape) != want[k]]
        ok = len(want) - len(missing) - len(wrong)
        size = path.stat().st_size / 2**20
        report.lines.append(
            f"  {name}: {size:.1f} MiB, loaded as plain tensors; {ok} of {len(want)} tensors inference reads "
            f"found with the expected shapes"
        )
        if missing or wrong:
            report.problems.append(
                f"speech decoder {name}: {len(missing)} tensors missing, {len(wrong)} of the wrong shape "
                f"(first: {(missing + wrong)[0]})"
            )
    return report


def describe(model_dir: str | Path) -> list[str]:
    """Lines for `inspect`: where the voice is, its sizes, and any problem with its files (never raises)."""
    report = check_voice(model_dir)
    return report.lines + [f"  problem: {p}" for p in report.problems]
