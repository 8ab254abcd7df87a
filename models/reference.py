"""Pure-torch VITA: the same towers and preprocessing, the transformers text model fed `inputs_embeds`.

It exists to check the vLLM model (same checkpoint, same prompt → same logits) and needs neither
vLLM nor a GPU. The text model is loaded by transformers from the checkpoint's own tensors, so its
name conversions (e.g. Mixtral's per-expert weights) are transformers', not ours.

The whale audio encoder is written out again here (`whale_encoder_reference`) in the training code's own
formulation: padding mask subsampled by slicing, the static chunk mask built row by row, explicit
softmax with fp16-min filling. It reads the tower's weights but none of its attention or mask code, so
the vLLM-vs-reference comparison also checks the tower's SDPA path and its masks.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .audio_features import audio_token_count
from .config import VitaConfig, register_config
from .encoders import embed_images, make_audio_tower, make_vision_tower
from .image_tiling import image_to_pixel_values
from .layout import map_checkpoint_name
from .towers import WhaleAudioEncoder


class ReferenceVita(nn.Module):
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from .checkpoint import audio_feature_extractor, open_checkpoint

        register_config()
        model_dir = Path(model_dir)
        config = open_checkpoint(model_dir).config  # any published format, as the engine reads it
        self.config = config
        self.vision_tower, self.vision_projector = make_vision_tower(config)
        self.audio_tower, self.audio_projector = make_audio_tower(config)
        towers, text = _split_checkpoint(load_file(str(model_dir / "model.safetensors")))
        missing, unexpected = self.load_state_dict(towers, strict=False)
        if unexpected or any(not k.startswith("language_model.") for k in missing):
            raise ValueError(f"tower weights do not fit: missing={missing} unexpected={unexpected}")
        self.language_model = _load_text_model(config, text)
        self.features = audio_feature_extractor(config)
        self.to(dtype).eval()

    @torch.inference_mode()
    def logits(
        self,
        token_ids: list[int],
        images: list[Image.Image] = (),  # type: ignore[assignment]
        audios: list[np.ndarray] = (),  # type: ignore[assignment]
        max_dynamic_patch: int | None = None,
    ) -> torch.Tensor:
        """Next-token logits after `token_ids` (one placeholder per item, as the engine takes them)."""
        cfg = self.config
        image_embeds = [
            embed_images(self.vision_tower, self.vision_projector, cfg, torch.from_numpy(px), [px.shape[0]])[0]
            for px in (
                image_to_pixel_values(
                    im,
                    max_dynamic_patch=max_dynamic_patch or cfg.max_dynamic_patch,
                    min_dynamic_patch=cfg.min_dynamic_patch,
                    image_size=cfg.vision_config.image_size,
                    use_thumbnail=cfg.use_thumbnail,
                )
                for im in images
            )
        ]
        audio_embeds = []
        a = cfg.audio_config
        for audio in audios:
            feats = self.features(np.asarray(audio, dtype=np.float32))
            clip = torch.from_numpy(feats)[None]
            hidden, _ = whale_encoder_reference(
                self.audio_tower, clip, chunk_size=a.chunk_size, left_chunks=a.left_chunks
            )
            emb = self.audio_projector(hidden)[0]
            assert emb.shape[0] == audio_token_count(feats.shape[0])
            audio_embeds.append(emb)
        text_embed = self.language_model.get_input_embeddings()
        pieces: list[torch.Tensor] = []
        media = {cfg.image_token_index: iter(image_embeds), cfg.audio_token_index: iter(audio_embeds)}
        for token in token_ids:
            if token in media:
                pieces.append(next(media[token]))
            else:
                pieces.append(text_embed(torch.tensor([token])))
        embeds = torch.cat(pieces).unsqueeze(0).to(text_embed.weight.dtype)
        return self.language_model(inputs_embeds=embeds).logits[0, -1].float()


def whale_encoder_reference(
    tower: WhaleAudioEncoder,
    features: torch.Tensor,
    lengths: torch.Tensor | None = None,
    chunk_size: int = -1,
    left_chunks: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream whale's eval forward with a static chunk mask (or none), on `tower`'s weights.

    (B, T, F) fbank (right-padded rows, `lengths` valid frames each) -> (B, T', H) and T' lengths. Follows
    the training code step by step: the (B, 1, T) padding mask is subsampled by slicing `[2::2][2::2]`; with
    `chunk_size > 0` it is ANDed with the chunk mask, built row by row; masked scores are filled with
    fp16-min and zeroed after the softmax. Only rows within each length are meaningful.
    """
    batch, frames, _ = features.shape
    if lengths is None:
        lengths = torch.full((batch,), frames, dtype=torch.long)
    weight = tower.subsampling.out.weight
    dtype, device = weight.dtype, weight.device
    # ~make_pad_mask(lengths): (B, 1, T), True on valid frames
    masks = (torch.arange(frames, device=device)[None, :] < lengths.to(device)[:, None]).unsqueeze(1)

    conv0, conv1 = tower.subsampling.conv_in[0], tower.subsampling.conv_in[2]
    x = F.relu(F.conv2d(features.to(device, dtype).unsqueeze(1), conv0.weight, conv0.bias, stride=2))
    x = F.relu(F.conv2d(x, conv1.weight, conv1.bias, stride=2))
    b, c, t, f = x.shape
    x = F.linear(x.transpose(1, 2).reshape(b, t, c * f), weight, tower.subsampling.out.bias)
    masks = masks[:, :, 2::2][:, :, 2::2]  # (B, 1, T')
    assert masks.shape[-1] == t
    out_lengths = masks.squeeze(1).sum(1)
    if chunk_size > 0:
        chunks = torch.zeros(t, t, dtype=torch.bool, device=device)
        for i in range(t):
            start = 0 if left_chunks < 0 else max((i // chunk_size - left_chunks) * chunk_size, 0)
            chunks[i, start : min((i // chunk_size + 1) * chunk_size, t)] = True
        masks = masks & chunks.unsqueeze(0)  # (B, T', T')

    hidden = x.shape[-1]
    linear, norm = tower.embeddings.embedding[0], tower.embeddings.embedding[1]
    x = F.relu(F.layer_norm(F.linear(x, linear.weight, linear.bias), (hidden,), norm.weight, norm.bias, 1e-5))
    x = x * math.sqrt(hidden)
    position = torch.arange(t, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, hidden, 2, dtype=torch.float32) * -(math.log(10000.0) / hidden))
    pos_emb = torch.zeros(1, t, hidden)
    pos_emb[0, :, 0::2] = torch.sin(position * div_term)
    pos_emb[0, :, 1::2] = torch.cos(position * div_term)
    pos_emb = pos_emb.to(device, dtype)

    blocked = masks.unsqueeze(1).eq(0)  # (B, 1, 1 or T', T')
    fill = float(torch.finfo(torch.float16).min)
    for layer in tower.encoder.layers:
        attn, ff = layer.self_attn, layer.feed_forward
        heads = attn.num_heads
        d_k = hidden // heads
        y = F.layer_norm(x, (hidden,), layer.norm1.weight, layer.norm1.bias, 1e-5)
        q = F.linear(y, attn.linear_q.weight, attn.linear_q.bias).view(b, t, heads, d_k)
        k = F.linear(y, attn.linear_k.weight, attn.linear_k.bias).view(b, t, heads, d_k).transpose(1, 2)
        v = F.linear(y, attn.linear_v.weight, attn.linear_v.bias).view(b, t, heads, d_k).transpose(1, 2)
        p = F.linear(pos_emb, attn.linear_pos.weight).view(1, t, heads, d_k).transpose(1, 2)
        matrix_ac = torch.matmul((q + attn.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        matrix_bd = torch.matmul((q + attn.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        scores = ((matrix_ac + matrix_bd) / math.sqrt(d_k)).masked_fill(blocked, fill)
        weights = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        context = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, hidden)
        x = x + F.linear(context, attn.linear_out.weight, attn.linear_out.bias)
        y = F.layer_norm(x, (hidden,), layer.norm2.weight, layer.norm2.bias, 1e-5)
        x = x + F.linear(F.relu(F.linear(y, ff.w_1.weight, ff.w_1.bias)), ff.w_2.weight, ff.w_2.bias)
    after = tower.encoder.layer_norm
    x = F.layer_norm(x, (hidden,), after.weight, after.bias, 1e-5)
    return x, out_lengths


def _split_checkpoint(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Towers under our module names; the text model under its own checkpoint names."""
    towers, text = {}, {}
    for name, tensor in weights.items():
        mapped = map_checkpoint_name(name)
        if mapped is None:
            continue
        if mapped.startswith("language_model."):
            text[name] = tensor
        else:
            towers[mapped] = tensor
    return towers, text


def _load_text_model(config: VitaConfig, weights: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        config.get_text_config().save_pretrained(tmp)
        save_file(weights, str(Path(tmp) / "model.safetensors"))
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
