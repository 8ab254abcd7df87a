"""Published checkpoints served as they are: one set of tensors in every config format VITA was published in.

The training format (the model repos' `vita-Qwen2` config, naming its tower repos by hub id) is served from an
offline HF cache that this test builds, by hub id; VITA's vLLM-port format and ours from directories. All
three must convert to the same model: the same config values, CMVN, placeholder rows and state tokens, and
identical greedy replies from real vLLM engines. `vita-duplex inspect` is run on each, and on a checkpoint
with a renamed tensor, which it must name and fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA, cpu_engine_settings

REPO = "tiny-org/VITA-tiny"
VISION_REPO = "tiny-org/InternViT-tiny"
AUDIO_REPO = "tiny-org/AudioEnc-tiny"
SEED = 11
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo: str, files_from: Path) -> None:
    """One repo in the HF cache layout (refs/main -> snapshots/<commit>/files), as a download leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    shutil.copytree(files_from, root / "snapshots" / COMMIT)


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same tiny VITA-1.5 in three formats: model specs as an operator gives them."""
    from models.tiny import build_tiny

    root = tmp_path_factory.mktemp("formats")
    ours = build_tiny("vita15", root / "ours", seed=SEED)
    port = build_tiny("vita15", root / "port", seed=SEED, config_format="port")
    training = build_tiny("vita15", root / "training", seed=SEED, config_format="training",
                          vision_tower=VISION_REPO, audio_encoder=AUDIO_REPO)
    cache = root / "hf-cache"
    _cache_repo(cache, REPO, training)
    _cache_repo(cache, VISION_REPO, root / "training-InternViT")
    _cache_repo(cache, AUDIO_REPO, root / "training-AudioEnc")
    shutil.rmtree(training)  # served only from the cache, by hub id
    return {"vita": str(ours), "port": str(port), "training": REPO, "cache": str(cache)}


@pytest.fixture
def offline_cache(formats: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE=1 with the test's cache, here and in the engine processes this test starts."""
    from huggingface_hub import constants

    cache = formats["cache"]
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return Path(cache)


def test_every_format_converts_to_the_same_config(formats: dict[str, str], offline_cache: Path) -> None:
    from models.checkpoint import open_checkpoint

    opened = {name: open_checkpoint(formats[name]) for name in ("vita", "port", "training")}
    assert {name: c.config_format for name, c in opened.items()} == {
        "vita": "vita", "port": "port", "training": "training"}
    reference = opened["vita"].config
    for name, ckpt in opened.items():
        config = ckpt.config
        assert config.layout == "vita15", name
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size", "eos_token_id", "rope_parameters", "rms_norm_eps"):
            assert getattr(config.get_text_config(), field) == getattr(reference.get_text_config(), field), (name, field)
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "image_size", "patch_size"):
            assert getattr(config.vision_config, field) == getattr(reference.vision_config, field), (name, field)
        for field in ("input_dim", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "adapter_hidden_size", "adapter_kernel_size"):
            assert getattr(config.audio_config, field) == getattr(reference.audio_config, field), (name, field)
        np.testing.assert_allclose(config.audio_config.cmvn_means, reference.audio_config.cmvn_means, rtol=1e-6)
        np.testing.assert_allclose(config.audio_config.cmvn_istds, reference.audio_config.cmvn_istds, rtol=1e-6)
        assert (config.image_token_index, config.audio_token_index) == (
            reference.image_token_index, reference.audio_token_index), name
        assert config.state_token_ids == reference.state_token_ids, name
        assert ckpt.warnings == [], (name, ckpt.warnings)
        assert ckpt.sources["cmvn"] == "the checkpoint's global_cmvn buffers", name
    training = opened["training"]
    # The tower values came from the tower repos named by hub id, found in the offline cache.
    assert VISION_REPO in training.sources["vision_config"], training.sources
    assert AUDIO_REPO in training.sources["audio_config"], training.sources
    assert "ignored the port's 51000" in opened["port"].sources["image_token_index"]
    # The user's files are untouched: the port config still says 51000.
    assert json.loads((Path(formats["port"]) / "config.json").read_text())["image_token_index"] == 51000


def test_missing_tower_repos_fall_back_to_tensor_shapes(formats: dict[str, str], offline_cache: Path,
                                                        tmp_path: Path) -> None:
    """Without the tower repos, shapes come from the tensors (the audio head count from pos_bias_u), and the
    source of each value is named."""
    from models.checkpoint import open_checkpoint, resolve_model_dir

    local = tmp_path / "training"
    shutil.copytree(resolve_model_dir(REPO), local)
    raw = json.loads((local / "config.json").read_text())
    raw["mm_vision_tower"], raw["mm_audio_encoder"] = "absent-org/InternViT", "/nonexistent/AudioEnc"
    (local / "config.json").write_text(json.dumps(raw))
    ckpt = open_checkpoint(local)
    reference = open_checkpoint(formats["vita"]).config
    assert ckpt.config.audio_config.num_attention_heads == reference.audio_config.num_attention_heads == 2
    assert "tensor shapes" in ckpt.sources["audio num_attention_heads"]
    assert "published default" in ckpt.sources["vision num_attention_heads"]  # not in InternViT's shapes
    assert ckpt.sources["cmvn"] == "the checkpoint's global_cmvn buffers"


def test_disagreeing_cmvn_sources_warn_and_name_both(formats: dict[str, str], tmp_path: Path) -> None:
    from models.checkpoint import open_checkpoint

    local = tmp_path / "port"
    shutil.copytree(formats["port"], local)
    extractor = local / "feature_extractor" / "preprocessor_config.json"
    data = json.loads(extractor.read_text())
    data["cmvn_means"] = [v + 1.0 for v in data["cmvn_means"]]
    extractor.write_text(json.dumps(data))
    ckpt = open_checkpoint(local)
    assert len(ckpt.warnings) == 1
    assert "global_cmvn buffers" in ckpt.warnings[0] and "feature extractor" in ckpt.warnings[0]
    assert ckpt.sources["cmvn"] == "the checkpoint's global_cmvn buffers"


def test_not_a_vita_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from models.checkpoint import CheckpointError, open_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'.*accepted model types: vita, vita-Qwen2"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="neither a directory nor a hub id"):
        open_checkpoint("./no/such/dir")


def _inspect(model: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "clients.cli", "inspect", model], check=False, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_inspect_passes_on_every_format_and_names_a_renamed_tensor(formats: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    env = {"HF_HUB_CACHE": formats["cache"], "HF_HUB_OFFLINE": "1"}
    for name in ("vita", "port", "training"):
        result = _inspect(formats[name], env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"config format: {name}" in result.stdout
        assert "query: id" in result.stdout and "'☞'" in result.stdout
        assert "placeholder rows: image 510, audio 511" in result.stdout
        assert "OK: 0 problem(s)" in result.stdout
    assert f"mm_vision_tower {VISION_REPO}" in _inspect(REPO, env).stdout

    broken = tmp_path / "broken"
    shutil.copytree(formats["vita"], broken)
    weights = load_file(str(broken / "model.safetensors"))
    old = "model.audio_encoder.adpter.project.weight"
    weights["model.audio_encoder.adapter.project.weight"] = weights.pop(old)
    save_file(weights, str(broken / "model.safetensors"))
    result = _inspect(str(broken))
    assert result.returncode == 1
    assert f"problem: missing: {old}" in result.stdout
    assert "problem: unexpected: model.audio_encoder.adapter.project.weight" in result.stdout


@pytest.mark.asyncio
async def test_greedy_replies_are_identical_across_formats(formats: dict[str, str], offline_cache: Path) -> None:
    """Real engines, one format at a time: the same image + text + audio prompt gives the same greedy tokens
    (the image makes the vision tower's head count matter: the training format gets it only from the tower
    repo found in the offline cache)."""
    from models.audio_features import decode_audio, to_mono_16k
    from models.engine import Sampling, VitaEngine
    from models.inputs import user_input

    clip = to_mono_16k(*decode_audio((DATA / "beckett.wav").read_bytes()))[: 16000 * 3]
    replies: dict[str, tuple[int, ...]] = {}
    for name in ("vita", "port", "training"):
        engine = await VitaEngine.start(cpu_engine_settings(formats[name]))  # type: ignore[arg-type]
        try:
            prompt = user_input(engine.prompts, text="What do you see and hear?", audios=[clip],
                                images=[(DATA / "house.png").read_bytes()])
            tokens: list[int] = []
            async for delta in engine.generate(prompt, sampling=Sampling(max_tokens=12, ignore_eos=True)):
                tokens.extend(delta.token_ids)
            replies[name] = tuple(tokens)
        finally:
            await engine.shutdown()
    assert len(replies["vita"]) == 12
    assert replies["port"] == replies["vita"]
    assert replies["training"] == replies["vita"]


def test_vita10_formats_convert_to_the_same_config(tmp_path: Path) -> None:
    """VITA-1.0 (Mixtral): the `vita-mixtral` training format and the `mixtral_multimodal` port, from directories
    (the training config naming its tower repos by local path)."""
    from models.checkpoint import open_checkpoint
    from models.tiny import build_tiny

    specs = {fmt: build_tiny("vita10", tmp_path / fmt, seed=SEED, config_format=fmt)  # type: ignore[arg-type]
             for fmt in ("vita", "training", "port")}
    opened = {fmt: open_checkpoint(path) for fmt, path in specs.items()}
    reference = opened["vita"].config
    assert reference.get_text_config().model_type == "mixtral"
    for fmt, ckpt in opened.items():
        config = ckpt.config
        assert (ckpt.config_format, config.layout) == (fmt, "vita10")
        assert config.get_text_config().to_dict() | {"architectures": None} == (
            reference.get_text_config().to_dict() | {"architectures": None}), fmt
        assert config.vision_config.num_attention_heads == reference.vision_config.num_attention_heads, fmt
        assert config.audio_config.num_attention_heads == reference.audio_config.num_attention_heads, fmt
        assert config.state_token_ids == reference.state_token_ids, fmt
        assert (config.image_token_index, config.audio_token_index) == (
            reference.image_token_index, reference.audio_token_index), fmt
        assert ckpt.warnings == [], (fmt, ckpt.warnings)
    assert str(tmp_path / "training-AudioEnc") in opened["training"].sources["audio_config"]
