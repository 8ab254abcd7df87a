"""Build VITA's towers from a `VitaConfig` and run them on processed inputs.

Shared by the vLLM model and the pure-torch reference, so both embed images and audio with the
same code and only the text model differs.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VitaConfig
from .towers import (
    AudioProjector,
    InternVisionModel,
    VisionProjector,
    WhaleAudioEncoder,
    encode_audio,
    encode_images,
)


def make_vision_tower(config: VitaConfig) -> tuple[InternVisionModel, VisionProjector]:
    v = config.vision_config
    tower = InternVisionModel(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        qkv_bias=v.qkv_bias,
        hidden_act=v.hidden_act,
    )
    projector = VisionProjector(config.vision_projector_in, config.get_text_config().hidden_size)
    return tower, projector


def make_audio_tower(config: VitaConfig) -> tuple[WhaleAudioEncoder, AudioProjector]:
    a = config.audio_config
    tower = WhaleAudioEncoder(
        input_dim=a.input_dim,
        hidden_size=a.hidden_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        intermediate_size=a.intermediate_size,
        max_position=a.max_position,
        chunk_size=a.chunk_size,
        left_chunks=a.left_chunks,
    )
    projector = AudioProjector(
        encoder_dim=a.hidden_size,
        llm_dim=config.get_text_config().hidden_size,
        hidden=a.adapter_hidden_size,
        kernel_size=a.adapter_kernel_size,
    )
    return tower, projector


def embed_images(
    tower: nn.Module, projector: nn.Module, config: VitaConfig, pixel_values: torch.Tensor, num_patches: list[int]
) -> list[torch.Tensor]:
    """One (tiles·tokens_per_tile, D) tensor per image, in order."""
    if not num_patches:
        return []
    dtype = next(tower.parameters()).dtype
    tokens = encode_images(tower, projector, pixel_values.to(dtype), config.downsample_ratio)
    per_image = torch.split(tokens, num_patches)
    return [t.reshape(-1, t.shape[-1]) for t in per_image]


def embed_audios(
    tower: nn.Module, projector: nn.Module, features: torch.Tensor, lengths: list[int]
) -> list[torch.Tensor]:
    """One (n_tokens, D) tensor per clip. Clips run one at a time: no padding, no masks."""
    dtype = next(tower.parameters()).dtype
    clips = torch.split(features, lengths)
    return [encode_audio(tower, projector, clip.to(dtype)) for clip in clips]
