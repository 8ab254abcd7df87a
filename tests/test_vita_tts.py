"""VITA-1.5's speech decoder (models.vita_tts) and its TTS backend (duplex.tts_vita).

Pure torch first (layout, safe loading, reference math, streaming rules), then one vLLM engine serving the AR
decoder (module scope): logits parity with the reference, batching, abort, and the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.vita_tts.config import TTSConfigError, open_tts_checkpoint
from models.vita_tts.reference import (
    LlamaStack,
    ReferenceCodec,
    ReferenceDecoder,
    apply_penalty,
    top_k_probs,
)
from models.vita_tts.streaming import (
    FIRST_SENTENCE,
    LATER_SENTENCE,
    AudioCutter,
    SentenceStream,
    StreamParams,
    TokenWindows,
    find_cut,
    trim_leading_silence,
)
from models.vita_tts.tiny import build_tiny_tts
from models.vita_tts.weights import TTSWeightsError, fold_weight_norm, map_codec_names, safe_load


@pytest.fixture(scope="module")
def tts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tts(tmp_path_factory.mktemp("tts") / "vita_tts_ckpt", seed=7)


@pytest.fixture(scope="module")
def ref(tts_dir: Path) -> tuple[ReferenceDecoder, ReferenceCodec]:
    ckpt = open_tts_checkpoint(tts_dir)
    return ReferenceDecoder.load(ckpt), ReferenceCodec.load(ckpt)


# --- layout and safe loading --------------------------------------------------------------------------


def test_tiny_checkpoint_has_the_published_layout(tts_dir: Path) -> None:
    raw = json.loads((tts_dir / "decoder" / "model.json").read_text())
    assert isinstance(raw, list) and len(raw) == 3 and raw[2]["idim"] == raw[0]
    codec = json.loads((tts_dir / "codec" / "model.json").read_text())
    assert {"upsample_rates", "global_tokens", "n_codes", "residul_layer"} <= set(codec)
    assert np.prod(codec["upsample_rates"]) == 600  # 40 codec tokens per second at 24 kHz
    blob = torch.load(tts_dir / "codec" / "final.pt", weights_only=True)
    assert set(blob) == {"generator", "quantizer", "encoder"}
    assert "conv_pre.weight_g" in blob["generator"] and "conv_pre.weight_v" in blob["generator"]
    assert open_tts_checkpoint(tts_dir.parent).root == tts_dir  # found beside the model too


def test_model_dir_of_tiny_vita15_has_a_voice(tiny_dirs: dict[str, Path]) -> None:
    from duplex.tts_vita import has_vita_voice

    assert has_vita_voice(tiny_dirs["vita15"])
    assert not has_vita_voice(tiny_dirs["vita10"])


class Payload:
    """Any non-tensor object: unpickling it would run arbitrary code paths."""


@pytest.mark.parametrize("bad", [argparse.Namespace(a=1), Payload()])
def test_final_pt_needing_more_than_tensors_is_refused(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "final.pt"
    torch.save({"model": {"embedding.weight": torch.zeros(2, 2)}, "args": bad}, path)
    with pytest.raises(TTSWeightsError, match="refusing to load"):
        safe_load(path)


def test_final_pt_model_wrapper_and_counters_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "final.pt"
    torch.save({"model": {"embedding.weight": torch.ones(2, 2)}, "epoch": 3, "lr": [0.1]}, path)
    assert set(safe_load(path)) == {"model.embedding.weight"}


def test_bad_configs_say_what_is_wrong(tts_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tts_dir, copy)
    (copy / "decoder" / "model.json").write_text(json.dumps({"idim": 1}))
    with pytest.raises(TTSConfigError, match=r"\[idim, odim"):
        open_tts_checkpoint(copy)
    with pytest.raises(TTSConfigError, match="no vita_tts_ckpt"):
        open_tts_checkpoint(tmp_path / "nowhere")


def test_weight_norm_folds_as_torch_computes_it() -> None:
    for conv in (torch.nn.Conv1d(6, 5, 3), torch.nn.ConvTranspose1d(6, 4, 5, 2)):
        wn = torch.nn.utils.weight_norm(conv)
        with torch.no_grad():
            wn.weight_g.mul_(torch.linspace(0.5, 2.0, wn.weight_g.numel()).view_as(wn.weight_g))
        wn(torch.randn(1, 6, 9))  # recompute weight from g, v
        folded = fold_weight_norm(wn.weight_g.detach(), wn.weight_v.detach())
        torch.testing.assert_close(folded, wn.weight.detach(), rtol=1e-6, atol=1e-6)
    names = map_codec_names(
        {
            "generator.a.weight_g": torch.ones(2, 1, 1),
            "generator.a.weight_v": torch.ones(2, 3, 1),
            "encoder.x": torch.ones(1),
        }
    )
    assert set(names) == {"generator.a.weight"}
    with pytest.raises(TTSWeightsError, match="lacks its v"):
        map_codec_names({"generator.a.weight_g": torch.ones(2, 1, 1)})


# --- reference math -------------------------------------------------------------------------------------


def test_llama_layer_matches_transformers_eager(ref: tuple[ReferenceDecoder, ReferenceCodec]) -> None:
    """Our Llama layer == transformers' LlamaDecoderLayer (eager), bidirectional and causal masks."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dec, _ = ref
    cfg = dec.cfg
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=2048,
    )
    hf_cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(hf_cfg, 0).eval()
    layer.load_state_dict({k[len("layers.0.") :]: v for k, v in dec.w.items() if k.startswith("layers.0.")})
    x = torch.randn(1, 9, cfg.hidden_size)
    pos = torch.arange(9)[None]
    cos_sin = LlamaRotaryEmbedding(hf_cfg)(x, pos)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    for allowed in (None, causal):
        mask = (
            torch.zeros(1, 1, 9, 9)
            if allowed is None
            else (~allowed).float()[None, None] * torch.finfo(x.dtype).min
        )
        with torch.no_grad():
            out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        ours = LlamaStack(dec.w, "layers.", 1, cfg).layer(0, x[0], pos[0], allowed)
        torch.testing.assert_close(ours, out[0], rtol=1e-5, atol=1e-5)


def test_incremental_decoding_equals_the_prefix_lm_pass(ref: tuple[ReferenceDecoder, ReferenceCodec]) -> None:
    dec, _ = ref
    x = torch.randn(10, dec.cfg.idim, generator=torch.Generator().manual_seed(1))
    tokens = list(dec.generate(x, max_tokens=25, generator=torch.Generator().manual_seed(2)))
    assert len(tokens) == 25 and all(
        0 <= t < dec.cfg.odim for t in tokens
    )  # specials are banned in tiny weights
    forced = dec.forced_logits(x, tokens)
    prompt = dec.prompt(x)
    cache: list = []
    dec.ar(prompt, torch.arange(len(prompt)), None, cache)
    steps = []
    for i, tok in enumerate([dec.cfg.sos_id, *tokens]):
        h = dec.ar(dec.embed(torch.tensor([tok])), torch.tensor([len(prompt) + i]), None, cache)
        steps.append(dec.head(h)[0])
    torch.testing.assert_close(torch.stack(steps), forced, rtol=1e-5, atol=1e-4)


def test_the_prompt_is_bidirectional(ref: tuple[ReferenceDecoder, ReferenceCodec]) -> None:
    """Upstream's prompt pass has no mask: the bos position already sees the last text vector."""
    dec, _ = ref
    x = torch.randn(6, dec.cfg.idim)
    y = x.clone()
    y[-1] += 1.0
    a, b = dec.prompt_layer_inputs(x), dec.prompt_layer_inputs(y)
    assert torch.equal(a[0, 0], b[0, 0])  # layer 0 input at bos: the bos embedding
    assert not torch.allclose(a[0, 1], b[0, 1])  # layer 1 input at bos depends on a later position


def test_top_k_2_and_upstream_penalty() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    probs = top_k_probs(logits, 2)
    assert probs[0] == 0 and probs[3] == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    torch.testing.assert_close(probs[1] / probs[2], torch.tensor(np.e, dtype=torch.float32))
    # the window holds token 1 twice: upstream divides once per occurrence (a set of tensors never dedupes)
    penalized = apply_penalty(logits, [5, 1, 1, 2], window=3, penalty=2.0)
    torch.testing.assert_close(penalized, torch.tensor([1.0, 0.75, 1.0, -1.0]))
    assert torch.equal(apply_penalty(logits, [1, 1], window=-1, penalty=2.0), logits)  # the demo: no penalty


def test_codec_shapes_and_batching(ref: tuple[ReferenceDecoder, ReferenceCodec]) -> None:
    _, codec = ref
    codes = torch.randint(0, codec.cfg.n_codes, (3, 30), generator=torch.Generator().manual_seed(0))
    batch = codec.decode(codes)
    assert batch.shape == (3, 1, 30 * 600) and batch.abs().max() <= 1.0 and batch.abs().mean() > 1e-3
    for row in range(3):
        torch.testing.assert_close(codec.decode(codes[row : row + 1])[0], batch[row], rtol=1e-5, atol=1e-5)


# --- streaming rules -------------------------------------------------------------------------------------


def expected_windows(n: int, chunk: int, pad: int = 10) -> list[tuple[int, int, int, int]]:
    """(start, end, drop_left, drop_right) of every codec window for n tokens, from the rule in words."""
    out, start, left = [], 0, 0
    while start + left + chunk + pad <= n:
        end = start + left + chunk + pad
        out.append((start, end, left, pad))
        start, left = end - 2 * pad, pad
    if n > start:
        out.append((start, n, left, 0))
    return out


def windows_of(tokens: list[int], params: StreamParams) -> list[tuple[int, int, int, int]]:
    w, out, consumed = TokenWindows(params), [], 0
    spans = []
    for i, t in enumerate(tokens):
        win = w.push(t)
        if win is not None:
            spans.append((i + 1 - len(win.tokens), i + 1, win.drop_left, win.drop_right))
        consumed = i + 1
    last = w.finish()
    if last is not None:
        spans.append((consumed - len(last.tokens), consumed, last.drop_left, last.drop_right))
    out.extend(spans)
    return out


def test_first_sentence_windows_are_upstreams() -> None:
    spans = windows_of(list(range(100)), FIRST_SENTENCE)
    assert spans == [(0, 30, 0, 10), (10, 50, 10, 10), (30, 70, 10, 10), (50, 90, 10, 10), (70, 100, 10, 0)]
    # the kept tokens tile the stream exactly once
    kept = [i for s, e, lo, hi in spans for i in range(s + lo, e - hi)]
    assert kept == list(range(100))


@pytest.mark.parametrize("n", [0, 5, 29, 30, 31, 49, 50, 51, 137, 400])
@pytest.mark.parametrize("params", [FIRST_SENTENCE, LATER_SENTENCE])
def test_windows_on_any_length(n: int, params: StreamParams) -> None:
    spans = windows_of(list(range(n)), params)
    assert spans == expected_windows(n, params.chunk)
    assert [i for s, e, lo, hi in spans for i in range(s + lo, e - hi)] == list(range(n))


def numpy_cut(x: np.ndarray, n: int, threshold: float) -> int | None:
    """The cut rule restated with cumulative sums (float64), independently of `find_cut`."""
    a = np.abs(x.astype(np.float64))
    c = np.concatenate([[0.0], np.cumsum(a)])
    sums = c[n:] - c[:-n]
    s0 = len(a) // 2 - n // 2
    j = int(np.argmin(sums[s0:]))
    start = max(0, j + s0)
    end = min(len(a), j + n + start)  # the offset counted twice, as upstream does
    k = start + int(np.argmin(a[start:end]))
    return k if sums[s0 + j] / n < threshold else None


def test_cut_lands_in_the_quiet_part_after_the_middle() -> None:
    rng = np.random.default_rng(0)
    x = (0.5 * rng.standard_normal(24000)).astype(np.float32)
    x[16000:19000] *= 0.001  # a gap after the middle
    x[3000:6000] *= 0.0001  # a quieter gap before the middle is never chosen
    cut = find_cut(torch.from_numpy(x), 2401, 0.015)
    assert cut is not None and 16000 <= cut < 19000
    assert cut == numpy_cut(x, 2401, 0.015)
    assert find_cut(torch.from_numpy(x), 2401, 0.0001) is None  # not quiet enough for this threshold
    loud = (0.5 + 0.1 * rng.random(24000)).astype(np.float32)
    assert find_cut(torch.from_numpy(loud), 2401, 0.1) is None


def test_cutter_holds_back_and_releases() -> None:
    cutter = AudioCutter(LATER_SENTENCE)
    loud = torch.full((12000,), 0.5)
    assert cutter.push(loud) is None  # no quiet point: held back
    quiet_tail = torch.cat([torch.full((6000,), 0.5), torch.zeros(6000)])
    out = cutter.push(quiet_tail)
    assert out is not None and out.numel() == 12000 + int(find_cut(quiet_tail, 2401, 0.015) or 0)
    final = cutter.push(torch.ones(100), final=True)
    assert final is not None and out.numel() + final.numel() == 24100  # nothing lost, nothing doubled


def test_trim_leading_silence() -> None:
    piece = torch.tensor([0.0, 0.01, -0.02, 0.5, 0.0, 0.2])
    assert torch.equal(trim_leading_silence(piece), piece[3:])
    quiet = torch.full((5,), 0.01)
    assert torch.equal(trim_leading_silence(quiet), quiet)  # upstream keeps it whole


@pytest.mark.parametrize("params", [FIRST_SENTENCE, LATER_SENTENCE])
def test_sentence_stream_on_a_fixed_token_stream(
    ref: tuple[ReferenceDecoder, ReferenceCodec], params: StreamParams
) -> None:
    """The whole streaming path on 173 fixed tokens == the rules restated independently (numpy)."""
    _, codec = ref
    tokens = [
        int(t)
        for t in torch.randint(0, codec.cfg.n_codes, (173,), generator=torch.Generator().manual_seed(5))
    ]
    # ours
    stream = SentenceStream(params)
    ours: list[np.ndarray] = []

    def run(window) -> None:
        piece = stream.decoded(window, codec.decode(torch.tensor([window.tokens]))[0, 0])
        if piece is not None:
            ours.append(piece.numpy())

    for t in tokens:
        w = stream.windows.push(t)
        if w is not None:
            run(w)
    w = stream.windows.finish()
    assert w is not None
    run(w)
    # restated: expected windows, keep, cut with numpy_cut, held-back buffer, trim
    expected: list[np.ndarray] = []
    held = np.zeros(0, np.float32)
    for start, end, lo, hi in expected_windows(len(tokens), params.chunk):
        audio = codec.decode(torch.tensor([tokens[start:end]]))[0, 0].numpy()
        kept = audio[lo * 600 : len(audio) - hi * 600]
        if hi == 0:  # the last window
            piece, held = np.concatenate([held, kept]), np.zeros(0, np.float32)
        else:
            cut = numpy_cut(kept, 2401, params.threshold)
            if cut is None:
                held = np.concatenate([held, kept])
                continue
            piece, held = np.concatenate([held, kept[:cut]]), kept[cut:]
        if params.trim_leading:
            loud = np.nonzero(np.abs(piece) > 0.03)[0]
            piece = piece[loud[0] :] if loud.size else piece
        expected.append(piece)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)


# --- the AR decoder served by vLLM ---------------------------------------------------------------------

VOCAB = 68  # tiny odim 64 + 4 specials


@pytest.fixture(scope="module")
async def voice_engine(tiny_dirs: dict[str, Path]):
    from models.vita_tts.engine import VoiceEngine, VoiceSettings

    settings = VoiceSettings(
        tts_dir=str(tiny_dirs["vita15"] / "vita_tts_ckpt"),
        enforce_eager=True,
        kv_cache_bytes=32 << 20,
        max_num_seqs=16,
        logprobs_mode="raw_logits",
        max_logprobs=VOCAB,
        max_tokens=60,
        cpu_cores="0",
    )
    engine = await VoiceEngine.start(settings)
    yield engine
    await engine.shutdown()


async def _logits_of(engine, x: torch.Tensor, request_id: str, max_tokens: int, seed: int):
    tokens, rows = [], []
    async for ids, logprobs in engine.tokens(x, request_id, max_tokens=max_tokens, logprobs=-1, seed=seed):
        tokens += ids
        rows += [[lp[i].logprob for i in range(VOCAB)] for lp in logprobs]
    return tokens, torch.tensor(rows)


@pytest.mark.vllm
async def test_vllm_logits_equal_the_reference(voice_engine) -> None:
    """Sampled (top-k 2) sequences; at every step vLLM's raw logits == the reference's for that prefix."""
    x = torch.randn(9, voice_engine.ckpt.decoder.idim, generator=torch.Generator().manual_seed(3))
    tokens, got = await _logits_of(voice_engine, x, "parity-1", 40, seed=11)
    assert len(tokens) == 40
    want = voice_engine.decoder.forced_logits(x, tokens)[: len(tokens)]
    assert (got - want).abs().max().item() < 1e-4
    # top-k 2: every sampled token is one of the two best at its step
    top2 = want.topk(2, dim=-1).indices
    assert all(t in top2[i].tolist() for i, t in enumerate(tokens))


@pytest.mark.vllm
async def test_vllm_batched_sessions_each_match_their_reference(voice_engine) -> None:
    gens = [torch.Generator().manual_seed(100 + i) for i in range(6)]
    xs = [torch.randn(4 + 3 * i, voice_engine.ckpt.decoder.idim, generator=g) for i, g in enumerate(gens)]
    results = await asyncio.gather(
        *[_logits_of(voice_engine, x, f"batch-{i}", 30, seed=i) for i, x in enumerate(xs)]
    )
    for x, (tokens, got) in zip(xs, results, strict=True):
        want = voice_engine.decoder.forced_logits(x, tokens)[: len(tokens)]
        assert (got - want).abs().max().item() < 1e-4


@pytest.mark.vllm
async def test_forced_tokens_in_the_prompt(voice_engine) -> None:
    """Token rows after the carrier prompt (prefill, not decode) run as plain tokens too."""
    from vllm import SamplingParams

    dec = voice_engine.decoder
    x = torch.randn(7, dec.cfg.idim, generator=torch.Generator().manual_seed(9))
    forced = [3, 17, 17, 42, 0, 63]
    rows = voice_engine.prompt_embeds(x)
    token_rows = torch.cat(
        [dec.embed(torch.tensor(forced)), torch.zeros(len(forced), rows.shape[1] - dec.cfg.hidden_size)], 1
    )
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False)
    final = None
    async for out in voice_engine._llm.generate(
        {"prompt_embeds": torch.cat([rows, token_rows])}, params, request_id="forced-1"
    ):
        final = out
    got = torch.tensor([final.outputs[0].logprobs[0][i].logprob for i in range(VOCAB)])
    want = dec.forced_logits(x, forced)[-1]
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.vllm
async def test_speak_streams_audio_and_leaving_aborts(voice_engine) -> None:
    from models.vita_tts.engine import SpeechStats

    x = torch.randn(8, voice_engine.ckpt.decoder.idim, generator=torch.Generator().manual_seed(4))
    stats = SpeechStats()
    pieces = [p async for p in voice_engine.speak(x, "speak-1", FIRST_SENTENCE, max_tokens=60, stats=stats)]
    assert stats.tokens == 60 and all(p.dtype == np.float32 for p in pieces)
    assert sum(p.size for p in pieces) <= 60 * 600
    assert voice_engine.num_unfinished() == 0
    # leave after the first piece: the request is aborted in vLLM at once
    gen = voice_engine.speak(x, "speak-2", FIRST_SENTENCE, max_tokens=2000)
    await gen.__anext__()
    assert voice_engine.num_unfinished() == 1
    t0 = time.perf_counter()
    await gen.aclose()
    elapsed = time.perf_counter() - t0
    assert voice_engine.num_unfinished() == 0
    assert elapsed < 0.05, f"abort took {elapsed * 1000:.1f} ms"


@pytest.mark.vllm
async def test_vita_tts_backend_and_barge_in(voice_engine, tiny_dirs: dict[str, Path]) -> None:
    from duplex.tts import TextToSpeech
    from duplex.tts_vita import VitaVoice, prepare_text
    from models.vita_tts.engine import TextEmbedder

    voice = VitaVoice(voice_engine, TextEmbedder(tiny_dirs["vita15"], voice_engine.ckpt.decoder.idim))
    tts = voice.session()
    assert isinstance(tts, TextToSpeech) and tts.sample_rate == 24000
    assert prepare_text("☞Hello, World.<|im_end|>", first=True) == "hello。 world."
    async with contextlib.aclosing(tts.synthesize("Hello there, how are you?")) as chunks:
        audio = [c async for c in chunks]
    assert audio and tts.last_stats is not None and tts.last_stats.tokens == 60
    assert tts.last_stats.first_audio is not None
    # barge-in: the runtime cancels the synthesis task mid-sentence; nothing is left running in vLLM
    started = asyncio.Event()
    tts.max_tokens = 2000  # far longer than the test: the cancel lands mid-sentence

    async def speak() -> None:
        # first=True: the first sentence's looser cut threshold finds quiet points in the tiny codec's output
        # (later sentences hold their audio back until a 0.015 quiet point, which random weights never have)
        text = "The quick brown fox jumps over the lazy dog."
        async with contextlib.aclosing(tts.synthesize(text, first=True)) as chunks:
            async for _ in chunks:
                started.set()

    task = asyncio.ensure_future(speak())
    await asyncio.wait_for(started.wait(), 60)
    assert voice_engine.num_unfinished() == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert voice_engine.num_unfinished() == 0
    assert tts._next_is_first  # the interrupted response is over: the next sentence starts a new one


# --- without vLLM: offline synthesis and inspect ---------------------------------------------------------


def test_offline_synthesis_and_describe(tiny_dirs: dict[str, Path]) -> None:
    from models.vita_tts.offline import describe, synthesize

    audio, rate = synthesize(tiny_dirs["vita15"], ["Hello there, friend.", "How are you?"], max_tokens=45)
    assert rate == 24000 and audio.dtype == np.float32
    assert 0 < audio.size <= 2 * 45 * 600
    lines = describe(tiny_dirs["vita15"])
    assert lines[0].startswith("speech decoder: ") and "problem" not in "".join(lines)
    assert "none" in describe(tiny_dirs["vita10"])[0]
