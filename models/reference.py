"""Pure-torch VITA: the same towers and preprocessing, the transformers text model fed `inputs_embeds`.

It exists to check the vLLM model (same checkpoint, same prompt → same logits) and needs neither
vLLM nor a GPU. The text model is loaded by transformers from the checkpoint's own tensors, so its
name conversions (e.g. Mixtral's per-expert weights) are transformers', not ours.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .audio_features import AudioFeatureExtractor, audio_token_count
from .config import VitaConfig, register_config
from .encoders import embed_audios, embed_images, make_audio_tower, make_vision_tower
from .image_tiling import image_to_pixel_values
from .layout import map_checkpoint_name


class ReferenceVita(nn.Module):
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from transformers import AutoConfig

        register_config()
        model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(str(model_dir))
        assert isinstance(config, VitaConfig)
        self.config = config
        self.vision_tower, self.vision_projector = make_vision_tower(config)
        self.audio_tower, self.audio_projector = make_audio_tower(config)
        towers, text = _split_checkpoint(load_file(str(model_dir / "model.safetensors")))
        missing, unexpected = self.load_state_dict(towers, strict=False)
        if unexpected or any(not k.startswith("language_model.") for k in missing):
            raise ValueError(f"tower weights do not fit: missing={missing} unexpected={unexpected}")
        self.language_model = _load_text_model(config, text)
        self.features = AudioFeatureExtractor.from_dict(
            json.loads((model_dir / "feature_extractor" / "preprocessor_config.json").read_text())
        )
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
        for audio in audios:
            feats = self.features(np.asarray(audio, dtype=np.float32))
            (emb,) = embed_audios(self.audio_tower, self.audio_projector, torch.from_numpy(feats), [feats.shape[0]])
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
