"""VITA as an out-of-tree vLLM model (processing info, dummy inputs, processor, model in one file).

Prompts arrive as token ids with ONE placeholder id per image/audio item (see `models.prompts`);
the processor expands each into the item's embedding count. Images are tiled InternVL-style
(`max_dynamic_patch` per request through `mm_processor_kwargs`), audio becomes CMVN fbank.
The text model is whatever `text_config` names, built by vLLM's own registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.sequence import IntermediateTensors

from . import feature_cache
from .audio_features import SAMPLE_RATE, AudioFeatureExtractor, audio_token_count
from .checkpoint import audio_feature_extractor
from .config import VitaConfig
from .encoders import embed_audios, embed_images, make_audio_tower, make_vision_tower
from .image_tiling import image_to_pixel_values
from .layout import CHECKPOINT_PREFIXES, DROPPED_PREFIXES

# vLLM reserves encoder-cache room for the largest item; one clip is capped at ~60 s.
MAX_AUDIO_SECONDS = 60.0


class VitaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> VitaConfig:
        return self.ctx.get_hf_config(VitaConfig)

    @cached_property
    def feature_extractor(self) -> AudioFeatureExtractor:
        # The CMVN was chosen when the checkpoint was opened (`models.checkpoint`), whatever its format.
        return audio_feature_extractor(self.get_hf_config())

    def get_data_parser(self) -> MultiModalDataParser:
        return MultiModalDataParser(
            target_sr=SAMPLE_RATE,
            target_channels=1,
            audio_resample_method="soxr",  # torchaudio is unusable beside CPU torch
            expected_hidden_size=self._get_expected_hidden_size(),
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "audio": None}

    def max_image_tiles(self) -> int:
        config = self.get_hf_config()
        return config.max_dynamic_patch + (1 if config.use_thumbnail and config.max_dynamic_patch > 1 else 0)

    def max_audio_tokens(self) -> int:
        frames = 1 + (int(MAX_AUDIO_SECONDS * SAMPLE_RATE) - 400) // 160
        return audio_token_count(frames)

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int] | None = None
    ) -> Mapping[str, int]:
        return {
            "image": self.max_image_tiles() * self.get_hf_config().tokens_per_tile,
            "audio": self.max_audio_tokens(),
        }


class VitaDummyInputsBuilder(BaseDummyInputsBuilder[VitaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""  # the processor builds dummy prompts as ids: placeholders are not text

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_hf_config().vision_config.image_size
        # A 3:4 image of max_dynamic_patch tiles' area gets the largest grid plus the thumbnail.
        tiles = self.info.get_hf_config().max_dynamic_patch
        side = int(size * max(1, tiles) ** 0.5)
        return {
            "image": self._get_dummy_images(
                width=side, height=side, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
            ),
            "audio": self._get_dummy_audios(
                length=int(MAX_AUDIO_SECONDS * SAMPLE_RATE),
                num_audios=mm_counts.get("audio", 0),
                overrides=mm_options.get("audio"),
            ),
        }


class VitaMultiModalProcessor(BaseMultiModalProcessor[VitaProcessingInfo]):
    def get_dummy_inputs(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> ProcessorInputs:
        config = self.info.get_hf_config()
        data = self.dummy_inputs.get_dummy_mm_data(seq_len, mm_counts, mm_options)
        prompt = [config.image_token_index] * mm_counts.get("image", 0)
        prompt += [config.audio_token_index] * mm_counts.get("audio", 0)
        return ProcessorInputs(prompt=prompt, mm_data_items=self.info.parse_mm_data(data, validate=False))

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        config = self.info.get_hf_config()
        out: dict[str, Any] = {}
        images = list(hf_data.get("images") or [])
        if images:
            max_patch = int(hf_kwargs.get("max_dynamic_patch", config.max_dynamic_patch))  # type: ignore[call-overload]
            tiles = [
                image_to_pixel_values(
                    image,
                    max_dynamic_patch=max_patch,
                    min_dynamic_patch=config.min_dynamic_patch,
                    image_size=config.vision_config.image_size,
                    use_thumbnail=config.use_thumbnail,
                )
                for image in images
            ]
            out["pixel_values"] = torch.from_numpy(np.concatenate(tiles))
            out["image_num_patches"] = torch.tensor([t.shape[0] for t in tiles])
        audios = list(hf_data.get("audio") or [])
        if audios:
            extractor = self.info.feature_extractor
            feats = [feature_cache.shared.features(extractor, np.asarray(a, dtype=np.float32)) for a in audios]
            out["audio_features"] = torch.from_numpy(np.concatenate(feats))
            out["audio_feature_lengths"] = torch.tensor([f.shape[0] for f in feats])
        return BatchFeature(out)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_patches = hf_inputs.get("image_num_patches", torch.empty(0, dtype=torch.long))
        lengths = hf_inputs.get("audio_feature_lengths", torch.empty(0, dtype=torch.long))
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", num_patches),
            "image_num_patches": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "audio_features": MultiModalFieldConfig.flat_from_sizes("audio", lengths),
            "audio_feature_lengths": MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        data = out_mm_kwargs.get_data()
        image_id, audio_id = config.image_token_index, config.audio_token_index

        def image_tokens(i: int) -> PromptUpdateDetails[list[int]]:
            n = int(data["image_num_patches"][i]) * config.tokens_per_tile
            return PromptUpdateDetails.select_token_id([image_id] * n, image_id)

        def audio_tokens(i: int) -> PromptUpdateDetails[list[int]]:
            n = audio_token_count(int(data["audio_feature_lengths"][i]))
            return PromptUpdateDetails.select_token_id([audio_id] * n, audio_id)

        return [
            PromptReplacement(modality="image", target=[image_id], replacement=image_tokens),
            PromptReplacement(modality="audio", target=[audio_id], replacement=audio_tokens),
        ]


def _weights_mapper() -> WeightsMapper:
    dropped: dict[str, str | None] = {prefix: None for prefix in DROPPED_PREFIXES}
    return WeightsMapper(orig_to_new_prefix={**dropped, **CHECKPOINT_PREFIXES})


@MULTIMODAL_REGISTRY.register_processor(
    VitaMultiModalProcessor, info=VitaProcessingInfo, dummy_inputs=VitaDummyInputsBuilder
)
class VitaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    hf_to_vllm_mapper = _weights_mapper()

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return {"image": "<image>", "audio": "<audio>"}.get(modality)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: VitaConfig = vllm_config.model_config.hf_config
        self.config = config
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower, self.vision_projector = make_vision_tower(config)
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_tower, self.audio_projector = make_audio_tower(config)
        with self._mark_language_model(vllm_config):
            text = config.get_text_config()
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=text,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=text.architectures,
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Embeddings per item; vLLM calls this per modality group, items in prompt order."""
        out: list[torch.Tensor] = []
        for key in kwargs:  # keep the order vLLM passed the modalities in
            if key == "pixel_values":
                num_patches = _as_list(kwargs["image_num_patches"])
                pixels = _as_tensor(kwargs["pixel_values"])
                out += embed_images(self.vision_tower, self.vision_projector, self.config, pixels, num_patches)
            elif key == "audio_features":
                lengths = _as_list(kwargs["audio_feature_lengths"])
                feats = _as_tensor(kwargs["audio_features"])
                out += embed_audios(self.audio_tower, self.audio_projector, feats, lengths)
        return out

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


def _as_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return torch.cat([_as_tensor(v) for v in value])
    raise TypeError(f"expected a tensor or a list of tensors, got {type(value).__name__}")


def _as_list(value: object) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _as_list(v)]
    return [int(value)]  # type: ignore[call-overload]
