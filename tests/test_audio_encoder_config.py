"""Tests for models/audio_encoder_config.py: upstream whale `train.yaml` and WeNet `global_cmvn` readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.audio_encoder_config import audio_config_from_train_yaml, global_cmvn_from_wenet_json
from models.config import VitaAudioConfig, VitaConfig
from models.encoders import make_audio_tower

# RECONSTRUCTED, not the published file. The real `train.yaml` lives in the audio-encoder weight directory
# and is in neither public repository. The key structure is the one upstream's code reads
# (`multimodal_encoder/builder.py`, `whale/init_model.py`, `whale/module/encoder/encoder.py`,
# `whale/module/component/{subsampling,transformer}.py`, `whale/adapter.py`); the values are those
# research/vita_weights.md reconstructed for VITA-1.5 (subsampling-transformer, 80 -> 1024, 24 blocks,
# 16 heads, FFN 4096, rel-enc, CNNSubsampling adapter with LayerNorm + GELU, kernel 5, llm_embed_dim 3584).
# chunk_size / left_chunks / dynamic chunks are the argparse defaults: the real values are unknown.
TRAIN_YAML = """\
input_dim: 80
is_json_cmvn: true
cmvn_file: null
encoder_conf:
  overview_conf:
    encoder-input-dim: 80
    encoder-output-dim: 1024
    encoder-layer-config: subsampling-transformer
  para_conf:
    subsampling:
      subsampling-rate: 4
      subsampling-input-dim: 80
      subsampling-output-dim: 1024
      subsampling-dropout-rate: 0.1
    transformer:
      transformer-input-dim: 1024
      transformer-output-dim: 1024
      transformer-attention-dim: 1024
      transformer-attention-heads: 16
      transformer-linear-units: 4096
      transformer-num-blocks: 24
      transformer-dropout-rate: 0.1
      transformer-attention-dropout-rate: 0.0
      transformer-positional-dropout-rate: 0.1
      transformer-input-layer: linear
      transformer-pos-enc-class: rel-enc
      transformer-normalize-before: true
      transformer-concat-after: false
      transformer-positionwise-layer-type: linear
      transformer-chunk_size: -1
      transformer-left_chunks: -1
      transformer-dynamic-chunks: true
model_conf:
  llm_path: Qwen2.5-7B-Instruct
  freeze_llm: true
  enc_out_dim: 1024
  llm_embed_dim: 3584
  kernel_size: 5
  adpter_type: subsampling
  activation_func: gelu
  norm: layer
  add_audio_bos_eos: false
  task_num: 20
dataset_conf:
  resample_conf:
    resample_rate: 16000
  fbank_conf:
    num_mel_bins: 80
    frame_length: 25
    frame_shift: 10
    dither: 1.0
"""

EXPECTED = {
    "input_dim": 80,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "adapter_hidden_size": 2048,
    "adapter_kernel_size": 5,
    "chunk_size": -1,
    "left_chunks": -1,
}


def _doc() -> dict:
    return yaml.safe_load(TRAIN_YAML)


def _write(tmp_path: Path, doc: dict | str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def _transformer(doc: dict) -> dict:
    return doc["encoder_conf"]["para_conf"]["transformer"]


def test_reconstructed_train_yaml(tmp_path: Path) -> None:
    config, notes = audio_config_from_train_yaml(_write(tmp_path, TRAIN_YAML), llm_hidden_size=3584)
    assert config == EXPECTED
    assert any("dynamic chunks in training" in n and "full attention" in n for n in notes)
    assert any("dither" in n for n in notes)
    assert not any("not set" in n for n in notes)
    assert not any("Kaldi" in n for n in notes)
    # The dict is VitaAudioConfig's own field names.
    audio = VitaAudioConfig(**config)
    assert {k: getattr(audio, k) for k in config} == config


def test_reconstructed_train_yaml_builds_the_published_shapes(tmp_path: Path) -> None:
    """On the meta device (nothing allocated): the parameter counts research/vita_weights.md derived."""
    config, _ = audio_config_from_train_yaml(_write(tmp_path, TRAIN_YAML))
    vita = VitaConfig(text_config={"model_type": "qwen2", "hidden_size": 3584}, audio_config=config)
    with torch.device("meta"):
        tower, projector = make_audio_tower(vita)
    assert (
        sum(p.numel() for p in tower.parameters()) == 357_950_464
    )  # 357,950,624 less 160 CMVN buffer elements
    assert sum(p.numel() for p in projector.parameters()) == 17_835_520


def test_static_chunks(tmp_path: Path) -> None:
    doc = _doc()
    _transformer(doc).update(
        {"transformer-dynamic-chunks": False, "transformer-chunk_size": 16, "transformer-left_chunks": 4}
    )
    config, notes = audio_config_from_train_yaml(_write(tmp_path, doc))
    assert (config["chunk_size"], config["left_chunks"]) == (16, 4)
    assert any("static chunk attention" in n and "640 ms" in n for n in notes)

    _transformer(doc)["transformer-left_chunks"] = -1
    config, notes = audio_config_from_train_yaml(_write(tmp_path, doc))
    assert (config["chunk_size"], config["left_chunks"]) == (16, -1)
    assert any("all left chunks" in n for n in notes)

    _transformer(doc)["transformer-chunk_size"] = -1
    config, notes = audio_config_from_train_yaml(_write(tmp_path, doc))
    assert (config["chunk_size"], config["left_chunks"]) == (-1, -1)
    assert "no chunk mask: full attention" in notes


def test_dynamic_chunks_override_a_static_chunk_size(tmp_path: Path) -> None:
    doc = _doc()
    _transformer(doc).update(
        {"transformer-chunk_size": 16, "transformer-left_chunks": 4}
    )  # dynamic stays true
    config, notes = audio_config_from_train_yaml(_write(tmp_path, doc))
    assert (config["chunk_size"], config["left_chunks"]) == (-1, -1)
    assert any("static chunk_size 16 is ignored" in n for n in notes)


def test_missing_keys_take_upstreams_argparse_defaults(tmp_path: Path) -> None:
    doc = _doc()
    del _transformer(doc)["transformer-dynamic-chunks"]  # default True: dynamic, so full attention
    del _transformer(doc)["transformer-num-blocks"]  # default 6
    del doc["model_conf"]["kernel_size"]  # audioEncoder's default 3
    config, notes = audio_config_from_train_yaml(_write(tmp_path, doc))
    assert config["num_hidden_layers"] == 6
    assert config["adapter_kernel_size"] == 3
    assert config["chunk_size"] == -1
    assert "transformer_dynamic_chunks not set: upstream's default True applies" in notes
    assert "transformer_num_blocks not set: upstream's default 6 applies" in notes
    assert "model_conf.kernel_size not set: upstream's default 3 applies" in notes


def test_keys_are_read_as_upstream_reads_them(tmp_path: Path) -> None:
    """`-` and `_` are the same; one namespace, later blocks win; a suffixed component name; unknown keys."""
    doc = _doc()
    tf = _transformer(doc)
    tf["transformer_chunk_size"] = tf.pop("transformer-chunk_size")
    tf["transformer-dynamic_chunks"] = tf.pop("transformer-dynamic-chunks")
    tf["transformer-dynamic_chunks"] = False
    tf["transformer-chunk_size"] = 8  # the same argument under another spelling, later in the block: it wins
    del tf["transformer-num-blocks"]
    doc["encoder_conf"]["overview_conf"]["transformer-num-blocks"] = 12  # applied first, never overridden
    doc["encoder_conf"]["para_conf"]["subsampling"]["transformer-linear-units"] = 1  # overridden later
    doc["encoder_conf"]["overview_conf"]["encoder-layer-config"] = "subsampling-transformer_1"
    doc["encoder_conf"]["para_conf"]["transformer_1"] = doc["encoder_conf"]["para_conf"].pop("transformer")
    doc["encoder_conf"]["para_conf"]["transformer_1"]["transformer-attention-head"] = 3  # a typo
    config, notes = audio_config_from_train_yaml(_write(tmp_path, doc))
    assert (config["chunk_size"], config["left_chunks"]) == (8, -1)
    assert config["num_hidden_layers"] == 12
    assert config["intermediate_size"] == 4096
    assert config["num_attention_heads"] == 16
    assert any("'transformer-attention-head' is not an encoder argument" in n for n in notes)


def test_dynamic_chunks_compared_as_upstream(tmp_path: Path) -> None:
    """Upstream tests `== True`: a quoted "true" is not True, so the static settings apply."""
    doc = _doc()
    _transformer(doc).update({"transformer-dynamic-chunks": "true", "transformer-chunk_size": 4})
    config, notes = audio_config_from_train_yaml(_write(tmp_path, doc))
    assert config["chunk_size"] == 4
    assert any("not a boolean" in n for n in notes)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: (
                d["encoder_conf"]["overview_conf"].update({"encoder-layer-config": "subsampling-mamba"}),
                d["encoder_conf"]["para_conf"].update({"mamba": {}}),
            ),
            "'subsampling-mamba' is not supported",
        ),
        (lambda d: _transformer(d).update({"transformer-pos-enc-class": "abs-enc"}), "pos-enc-class"),
        (lambda d: _transformer(d).update({"transformer-normalize-before": False}), "normalize-before"),
        (lambda d: _transformer(d).update({"transformer-attention-heads": 15}), "divisible"),
        (lambda d: _transformer(d).update({"transformer-input-dim": 512}), "subsampling-output-dim"),
        (lambda d: d["encoder_conf"]["overview_conf"].update({"encoder-input-dim": 40}), "encoder-input-dim"),
        (
            lambda d: d["encoder_conf"]["overview_conf"].update({"encoder-output-dim": 512}),
            "encoder-output-dim",
        ),
        (
            lambda d: d["encoder_conf"]["para_conf"]["subsampling"].update({"subsampling-rate": 6}),
            "subsampling-rate",
        ),
        (lambda d: d["model_conf"].update({"norm": "batch"}), "norm"),
        (lambda d: d["model_conf"].update({"activation_func": "relu"}), "activation_func"),
        (lambda d: d["model_conf"].update({"adpter_type": "cnn"}), "adpter_type"),
        (lambda d: d["model_conf"].update({"enc_out_dim": 512}), "enc_out_dim"),
        (lambda d: d["model_conf"].update({"llm_embed_dim": 4096}), "llm_embed_dim"),
        (lambda d: d["model_conf"].update({"adapter_type": "subsampling"}), "does not take"),
        (lambda d: d["dataset_conf"]["fbank_conf"].update({"num_mel_bins": 40}), "num_mel_bins"),
        (lambda d: d["encoder_conf"]["para_conf"].pop("transformer"), "no block"),
    ],
)
def test_what_we_cannot_build_is_refused(tmp_path: Path, edit, message: str) -> None:
    doc = _doc()
    edit(doc)
    with pytest.raises(ValueError, match=message):
        audio_config_from_train_yaml(_write(tmp_path, doc), llm_hidden_size=3584)


def test_wrong_types_are_refused(tmp_path: Path) -> None:
    doc = _doc()
    _transformer(doc)["transformer-chunk_size"] = "16"
    with pytest.raises(TypeError, match="chunk_size"):
        audio_config_from_train_yaml(_write(tmp_path, doc))
    with pytest.raises(TypeError, match="mapping"):
        audio_config_from_train_yaml(_write(tmp_path, "- just\n- a list\n"))


def test_yaml_tags_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    text = TRAIN_YAML + f'cmvn: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(yaml.YAMLError):
        audio_config_from_train_yaml(_write(tmp_path, text))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- cmvn


def _stats_file(tmp_path: Path, frames: np.ndarray) -> Path:
    path = tmp_path / "global_cmvn"
    stats = {
        "mean_stat": frames.sum(0).tolist(),
        "var_stat": (frames.astype(np.float64) ** 2).sum(0).tolist(),
        "frame_num": int(frames.shape[0]),
    }
    path.write_text(json.dumps(stats))
    return path


def test_cmvn_matches_direct_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.normal(loc=np.linspace(5, 15, 80), scale=np.linspace(0.5, 3.0, 80), size=(2000, 80))
    means, istds = global_cmvn_from_wenet_json(_stats_file(tmp_path, frames))
    assert means.dtype == istds.dtype == np.float32
    assert means.shape == istds.shape == (80,)
    np.testing.assert_allclose(means, frames.mean(0), rtol=1e-6)
    np.testing.assert_allclose(istds, 1.0 / frames.std(0), rtol=1e-5)  # population std (ddof 0), as WeNet


def test_cmvn_variance_floor(tmp_path: Path) -> None:
    frames = np.ones((10, 3)) * np.array([3.0, -2.0, 0.5])  # constant: variance 0 (or a rounding hair below)
    frames[:, 2] += np.arange(10)
    means, istds = global_cmvn_from_wenet_json(_stats_file(tmp_path, frames))
    np.testing.assert_allclose(means, [3.0, -2.0, 5.0], rtol=1e-7)
    assert istds[0] == istds[1] == np.float32(1e10)  # 1 / sqrt(1e-20)
    np.testing.assert_allclose(istds[2], 1.0 / np.arange(10).std(), rtol=1e-6)


def test_cmvn_rejects_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "global_cmvn"
    path.write_text(json.dumps({"mean_stat": [1.0], "frame_num": 3}))
    with pytest.raises(ValueError, match="var_stat"):
        global_cmvn_from_wenet_json(path)
    path.write_text(json.dumps({"mean_stat": [1.0, 2.0], "var_stat": [1.0], "frame_num": 3}))
    with pytest.raises(ValueError, match="equal"):
        global_cmvn_from_wenet_json(path)
    path.write_text(json.dumps({"mean_stat": [1.0], "var_stat": [1.0], "frame_num": 0}))
    with pytest.raises(ValueError, match="frame_num"):
        global_cmvn_from_wenet_json(path)
