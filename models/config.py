"""VITA checkpoint configuration: one HF config class for both published layouts.

VITA-1.5 = Qwen2.5 text model, VITA-1.0 = Mixtral text model; both share the InternViT vision
tower and the "whale" audio encoder. The text model is generic: whatever `text_config.model_type`
names, vLLM's registry builds it. Placeholder ids and state-token ids live here, never in code.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto import CONFIG_MAPPING

from .state_tokens import StateTokens

Layout = Literal["vita15", "vita10"]

VITA_ARCHITECTURE = "VitaForConditionalGeneration"


class VitaVisionConfig(PreTrainedConfig):
    """InternViT-300M-448px shape (the published `vision_config`)."""

    model_type = "intern_vit_6b"
    base_config_key = "vision_config"

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"


class VitaAudioConfig(PreTrainedConfig):
    """Whale audio encoder + CNN adapter shape (the published `audio_config`)."""

    model_type = "whale"
    base_config_key = "audio_config"

    input_dim: int = 80
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position: int = 5000
    adapter_hidden_size: int = 2048
    adapter_kernel_size: int = 5
    # Global CMVN the encoder applies to the fbank (upstream: its `global_cmvn` buffers). Filled when the
    # checkpoint is opened (`models.checkpoint`), from the first source that has them.
    cmvn_means: list | None = None
    cmvn_istds: list | None = None
    # Whale's static chunk attention, in subsampled frames (40 ms each): with chunk_size > 0 each frame
    # attends to its own chunk and `left_chunks` chunks before it (< 0: all of them). -1 = full attention,
    # as VITA's vLLM port (upstream train.yaml `transformer-chunk_size` / `transformer-left_chunks`; dynamic
    # chunks map to full attention, see models/audio_encoder_config.py).
    chunk_size: int = -1
    left_chunks: int = -1


class VitaConfig(PreTrainedConfig):
    model_type = "vita"
    sub_configs: ClassVar[dict[str, Any]] = {
        "text_config": AutoConfig, "vision_config": VitaVisionConfig, "audio_config": VitaAudioConfig
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    layout: str = "vita15"
    # Which published config format the checkpoint was read from ("vita", "training", "port"); informational.
    config_format: str = "vita"
    # Placeholder ids: embedding rows the tokenizer never produces (see README "placeholder ids").
    image_token_index: int = -1
    audio_token_index: int = -1
    # {"query": id, "noise": id, "text": id}; empty for a checkpoint trained without state tokens.
    state_token_ids: dict | None = None
    downsample_ratio: float = 0.5
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    tie_word_embeddings: bool = False
    # Whether the towers were trained. False: the model cannot understand that input (the embedded demo's
    # towers are random; a plain text LLM has none). The server then hears speech through its transcript
    # (`duplex.runtime`) and drops images and video with a notice instead of feeding the model noise.
    audio_tower_trained: bool = True
    vision_tower_trained: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.text_config, dict):
            model_type = self.text_config.get("model_type", "qwen2")
            self.text_config = CONFIG_MAPPING[model_type](**self.text_config)
        elif self.text_config is None:
            self.text_config = CONFIG_MAPPING["qwen2"]()
        if not isinstance(self.vision_config, VitaVisionConfig):
            self.vision_config = VitaVisionConfig(**(self.vision_config or {}))
        if not isinstance(self.audio_config, VitaAudioConfig):
            self.audio_config = VitaAudioConfig(**(self.audio_config or {}))
        super().__post_init__(**kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PreTrainedConfig:
        assert isinstance(self.text_config, PreTrainedConfig)
        return self.text_config

    def validate_placeholders(self, tokenizer_size: int) -> None:
        """Placeholders must be embedding rows no text can produce (VITA's 51000/51001 are words)."""
        vocab = self.get_text_config().vocab_size
        for name in ("image_token_index", "audio_token_index"):
            value = getattr(self, name)
            if not tokenizer_size <= value < vocab:
                raise ValueError(
                    f"{name}={value} must be an unused embedding row in [{tokenizer_size}, {vocab}): "
                    "ids below the tokenizer size are real text tokens and would corrupt placeholder counts"
                )

    @property
    def tokens_per_tile(self) -> int:
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return int(grid * grid * self.downsample_ratio**2)

    @property
    def vision_projector_in(self) -> int:
        return int(self.vision_config.hidden_size / self.downsample_ratio**2)


def hears(config: Any) -> bool:
    """Whether the model understands audio itself (a trained audio tower); else it hears through transcripts."""
    return bool(getattr(config, "audio_tower_trained", True))


def sees(config: Any) -> bool:
    """Whether the model understands images and video (a trained vision tower)."""
    return bool(getattr(config, "vision_tower_trained", True))


def state_tokens_of(config: VitaConfig) -> StateTokens | None:
    """The checkpoint's state tokens (ids and text), or None when it was trained without them."""
    ids = config.state_token_ids
    if not ids:
        return None
    return StateTokens.for_layout(config.layout, ids)


# The published config formats other than ours (see models/checkpoint.py). Code that reads config.json with
# the HF config classes (vLLM's tokenizer loader, AutoTokenizer) must not fail on them; `models.checkpoint`
# converts them to VitaConfig, and `auto_map` code in them is never run.
PUBLISHED_MODEL_TYPES = ("vita-Qwen2", "vita-mixtral", "qwen2_multimodal", "mixtral_multimodal")


def _plain_config_class(model_type: str) -> type[PreTrainedConfig]:
    """A config class that only holds a published config.json as data."""
    return type(f"Published_{model_type.replace('-', '_')}_Config", (PreTrainedConfig,), {"model_type": model_type})


def register_config() -> None:
    """Make `AutoConfig.from_pretrained` understand `model_type: vita` and read the other published formats as
    plain data (idempotent)."""
    for model_type, cls in (("vita", VitaConfig), *((t, None) for t in PUBLISHED_MODEL_TYPES)):
        if model_type in CONFIG_MAPPING:
            continue  # already registered in this process
        AutoConfig.register(model_type, cls or _plain_config_class(model_type))


def published_config(layout: Layout) -> VitaConfig:
    """Full-size config of the published checkpoints (VITA-1.5: Qwen2.5-7B; VITA-1.0: Mixtral-8x7B).

    Placeholders use embedding rows past the tokenizer: Qwen2.5's tokenizer has 151,665 tokens and
    the embedding 152,064 rows; the VITA-1.0 values are the last two rows of its 51,760.
    """
    if layout == "vita15":
        text = {
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064,
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
            "bos_token_id": 151643, "eos_token_id": 151645,
        }
        tokens = {"query": 144766, "noise": 146164, "text": 145789}
        image_id, audio_id = 152062, 152063
    else:
        text = {
            "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 51760,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
            "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        }
        tokens = {}  # the VITA-1.0 tokenizer is not public here: read <1>/<2>/<3> ids from it on load
        image_id, audio_id = 51758, 51759
    return VitaConfig(
        text_config=text, vision_config={}, audio_config={}, layout=layout,
        image_token_index=image_id, audio_token_index=audio_id, state_token_ids=tokens,
        architectures=[VITA_ARCHITECTURE],
    )
