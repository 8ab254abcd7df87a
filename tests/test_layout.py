"""The checkpoint layout we write and load is the published one, name for name and shape for shape."""

import gzip
import json
from pathlib import Path

import pytest

from models.config import published_config
from models.layout import checkpoint_shapes, map_checkpoint_name

with gzip.open(Path(__file__).parent / "data" / "vita_weight_shapes.json.gz", "rt") as _f:
    PUBLISHED = json.load(_f)


@pytest.mark.parametrize("layout", ["vita15", "vita10"])
def test_full_size_layout_equals_published_names_and_shapes(layout: str) -> None:
    ours = {name: list(shape) for name, shape in checkpoint_shapes(published_config(layout)).items()}
    published = PUBLISHED[layout]
    assert sorted(set(published) - set(ours)) == []
    assert sorted(set(ours) - set(published)) == []
    assert {n: s for n, s in ours.items() if published[n] != s} == {}
    assert len(ours) == {"vita15": 1159, "vita10": 1815}[layout]


def test_name_mapping() -> None:
    assert map_checkpoint_name("model.layers.3.self_attn.q_proj.weight") == (
        "language_model.model.layers.3.self_attn.q_proj.weight"
    )
    assert map_checkpoint_name("lm_head.weight") == "language_model.lm_head.weight"
    assert map_checkpoint_name("model.mm_projector.2.bias") == "vision_projector.linear_2.bias"
    assert map_checkpoint_name("model.audio_encoder.encoder.enc.1.encoders.5.self_attn.linear_q.weight") == (
        "audio_tower.encoder.layers.5.self_attn.linear_q.weight"
    )
    assert map_checkpoint_name("model.audio_encoder.encoder.global_cmvn.mean") is None
