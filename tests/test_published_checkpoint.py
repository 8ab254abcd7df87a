"""The published VITA-1.5 checkpoint at full size, as an operator downloads it: does the server accept it?

No weights are downloaded: the test writes the published training-format `config.json` (the derived copy in
tests/data/vita_weight_shapes.json.gz, `model_type: vita-Qwen2`), the real Qwen2.5 tokenizer (rebuilt from
VITA's merges.txt, see test_prompt_ids.py), the tower repos' files (InternViT's config.json, the audio
encoder's reconstructed train.yaml and a WeNet global_cmvn) and one safetensors file holding all 1159
published tensors at full size (16.6 GB declared, written as a sparse file: only the header and the CMVN
buffers hold data). `open_checkpoint` and `vita-duplex inspect` read only headers and small files, so this
checks the whole preflight on the real layout in seconds.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import DATA

CMVN = "model.audio_encoder.encoder.global_cmvn."


def _sparse_safetensors(path: Path, shapes: dict[str, list[int]], data: dict[str, np.ndarray]) -> None:
    """A valid safetensors file: bf16 tensors left as holes, the given float32 tensors written."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        dtype, width = ("F32", 4) if name in data else ("BF16", 2)
        size = int(np.prod(shape)) * width
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        start = handle.tell()
        for name, values in data.items():
            handle.seek(start + header[name]["data_offsets"][0])  # type: ignore[index]
            handle.write(values.astype("<f4").tobytes())
        handle.truncate(start + offset)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    from tests.test_prompt_ids import qwen_tokenizer

    with gzip.open(DATA / "vita_weight_shapes.json.gz") as handle:
        derived = json.load(handle)
    root = tmp_path_factory.mktemp("published")
    vision, audio, ckpt = root / "InternViT-300M-448px", root / "audio-encoder", root / "VITA1.5_ckpt"
    for folder in (vision, audio, ckpt):
        folder.mkdir()
    config = dict(derived["vita15_config"]["llm_config"])
    config.update(architectures=["VITAQwen2ForCausalLM"], mm_vision_tower=str(vision), mm_audio_encoder=str(audio))
    (ckpt / "config.json").write_text(json.dumps(config))
    (vision / "config.json").write_text(json.dumps(derived["vita15_config"]["vision_tower_config(InternViT-300M-448px/config.json)"]))
    (audio / "train.yaml").write_text(yaml.safe_dump(derived["vita15_config"]["audio_encoder_train_yaml_RECONSTRUCTED"]))
    rng = np.random.default_rng(0)
    means, istds = 10 + rng.normal(0, 1, 80), 0.25 + rng.uniform(0, 0.05, 80)
    frames = 1000
    (audio / "global_cmvn").write_text(json.dumps({
        "mean_stat": list(means * frames), "var_stat": list((1 / istds**2 + means**2) * frames), "frame_num": frames}))
    qwen_tokenizer().save_pretrained(str(ckpt))
    _sparse_safetensors(ckpt / "model.safetensors", derived["vita15"],
                        {CMVN + "mean": means.astype(np.float32), CMVN + "istd": istds.astype(np.float32)})
    return ckpt, means, istds


def test_the_published_vita15_checkpoint_opens_as_it_is(published: tuple[Path, np.ndarray, np.ndarray]) -> None:
    from models.checkpoint import check_tensors, open_checkpoint

    path, means, istds = published
    ckpt = open_checkpoint(path)
    config = ckpt.config
    assert (ckpt.config_format, config.layout) == ("training", "vita15")
    text = config.get_text_config()
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.vocab_size) == ("qwen2", 3584, 28, 152064)
    assert (config.vision_config.num_attention_heads, config.vision_config.hidden_size) == (16, 1024)
    assert (config.audio_config.num_attention_heads, config.audio_config.num_hidden_layers) == (16, 24)
    assert config.audio_config.chunk_size == -1  # dynamic chunks in training: full attention
    assert config.state_token_ids == {"query": 144766, "noise": 146164, "text": 145789}
    assert (config.image_token_index, config.audio_token_index) == (152062, 152063)
    np.testing.assert_allclose(config.audio_config.cmvn_means, means, rtol=1e-6)
    np.testing.assert_allclose(config.audio_config.cmvn_istds, istds, rtol=1e-5)
    assert ckpt.sources["cmvn"] == "the checkpoint's global_cmvn buffers"
    assert ckpt.warnings == []  # the audio repo's global_cmvn agrees with the buffers
    check = check_tensors(ckpt)
    assert check.ok, check.describe()
    assert len(ckpt.tensor_shapes) == 1159
    assert str(config.dtype).endswith("bfloat16")


def test_inspect_reports_the_published_checkpoint(published: tuple[Path, np.ndarray, np.ndarray]) -> None:
    from models.preflight import inspect_checkpoint

    report = inspect_checkpoint(str(published[0]))
    text = report.render()
    assert report.problems == [], text
    assert "config format: training" in text
    assert "query: id 144766 '☞'" in text and "noise: id 146164 '☟'" in text and "text: id 145789 '☜'" in text
    assert "placeholder rows: image 152062, audio 152063 (tokenizer size 151665, embedding rows 152064)" in text
    assert "tensors: 1159 found, layout expects 1159" in text
    assert "InternViT-300M-448px" in text and "train.yaml" in text
