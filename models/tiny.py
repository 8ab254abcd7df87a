"""Build tiny VITA checkpoints: the published layout with every dimension shrunk, random weights.

Seconds to build, no download: a byte-level BPE tokenizer trained here on a small built-in corpus
(with the chat template, the layout's special tokens and its state tokens), a config, one
safetensors file with the published tensor names, and the feature-extractor config with CMVN.
Placeholder ids sit in embedding rows past the tokenizer, as on real checkpoints.
`force_first_token` wires the weights so the first generated token is a chosen state token, which
lets tests drive the duplex gating end to end with a real engine.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file

from .config import VITA_ARCHITECTURE, Layout, VitaConfig
from .layout import checkpoint_shapes
from .prompts import SYSTEM_PROMPTS
from .state_tokens import STATE_TOKEN_TEXT

TINY_VOCAB = 512  # embedding rows; the tokenizer uses fewer, placeholders take the last two
ForcedToken = Literal["query", "noise", "text"]
TinyFormat = Literal["vita", "training", "port"]

_CORPUS = [
    *SYSTEM_PROMPTS.values(),
    "Hello! How can I help you today? I can see the image and hear your voice.",
    "The quick brown fox jumps over the lazy dog. What is the weather like today?",
    "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better.",
    "This is a test of the voice activity detector, one two three four five six seven eight nine ten.",
    "Describe this image, please. What do you see in the video? Tell me a short story about a cat.",
    "Sure, here is the answer: the capital of France is Paris, and water boils at 100 degrees.",
]

_SPECIALS: dict[str, list[str]] = {
    "vita15": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "vita10": ["<unk>", "<s>", "</s>"],
}

_CHAT_TEMPLATES: dict[str, str] = {
    "vita15": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "vita10": (
        "<s>{% for m in messages %}{% if m['role'] == 'assistant' %}bot:{% else %}{{ m['role'] }}:{% endif %}"
        "{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}bot:{% endif %}"
    ),
}


def build_tokenizer(layout: Layout, out_dir: Path) -> None:
    """Train a small byte-level BPE and save it (tokenizer.json + config with the chat template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[layout]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # State tokens are single tokens: ordinary tokens in Qwen2.5 (☞☟☜), added special tokens in VITA-1.0,
    # so typed "<2>" is split into characters there instead of forging a state token.
    state_tokens = [AddedToken(t, special=layout == "vita10", normalized=False) for t in STATE_TOKEN_TEXT[layout].values()]
    tok.add_tokens(state_tokens)
    eos = "<|im_end|>" if layout == "vita15" else "</s>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=specials[0],
        bos_token=None if layout == "vita15" else "<s>",
        unk_token=None if layout == "vita15" else "<unk>",
        chat_template=_CHAT_TEMPLATES[layout],
    )
    if len(fast) > TINY_VOCAB - 2:
        raise RuntimeError(f"tiny tokenizer has {len(fast)} tokens; rows {TINY_VOCAB - 2}+ are placeholders")
    fast.save_pretrained(str(out_dir))


def tiny_config(layout: Layout, tokenizer_dir: Path) -> VitaConfig:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>" if layout == "vita15" else "</s>")
    common = {
        "vocab_size": TINY_VOCAB, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32,  # vLLM's CPU attention needs head_dim >= 32
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "eos_token_id": eos_id,
    }
    if layout == "vita15":
        text = {**common, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "intermediate_size": 256}
    else:
        text = {
            **common, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "intermediate_size": 128,
            "num_local_experts": 4, "num_experts_per_tok": 2, "bos_token_id": tokenizer.convert_tokens_to_ids("<s>"),
        }
    states = {kind: tokenizer.convert_tokens_to_ids(tok) for kind, tok in STATE_TOKEN_TEXT[layout].items()}
    return VitaConfig(
        text_config=text,
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
        audio_config={
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "adapter_hidden_size": 128,
        },
        layout=layout,
        image_token_index=TINY_VOCAB - 2,
        audio_token_index=TINY_VOCAB - 1,
        state_token_ids=states,
        max_dynamic_patch=12,
        architectures=[VITA_ARCHITECTURE],
        eos_token_id=eos_id,
        dtype="float32",
    )


def random_weights(config: VitaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every published name. Fan-in scaling keeps activations O(1) so logits differ
    clearly between inputs (a test that the multimodal splice matters needs that). The CMVN buffers hold
    the same statistics as `feature_extractor_config(seed)`, as a real checkpoint's buffers and its
    feature-extractor file agree."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_shapes(config).items():
        out[name] = _init(name, shape, gen)
    cmvn = feature_extractor_config(seed)
    for key, buffer in (("cmvn_means", "mean"), ("cmvn_istds", "istd")):
        name = f"model.audio_encoder.encoder.global_cmvn.{buffer}"
        if name in out:
            out[name] = torch.tensor(cmvn[key], dtype=torch.float32)
    return out


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if "global_cmvn" in name:
        return torch.zeros(shape) if name.endswith("mean") else torch.ones(shape)
    if name.endswith((".ls1", ".ls2")):
        return torch.full(shape, 0.5)
    is_norm = any(k in name for k in ("norm", "bn2", "embed.1.")) and len(shape) == 1
    if is_norm and name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1 or "pos_bias" in name or "position_embedding" in name or "class_embedding" in name:
        return 0.05 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def _zero_residual_writes(weights: dict[str, torch.Tensor], dims: list[int]) -> None:
    """No attention or MLP output writes to `dims`, so there the residual stream keeps its embedding."""
    for name, tensor in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight")):
            tensor[dims, :] = 0.0


def mask_untokenizable_rows(
    weights: dict[str, torch.Tensor], tokenizer_size: int, also: tuple[int, ...] = ()
) -> None:
    """Keep the random model from emitting ids the tokenizer cannot decode (rows past it, placeholders).

    Residual dimension 1 is +1 for every token and untouched by the layers; those rows of lm_head read
    it with a large negative weight.
    """
    weights["model.embed_tokens.weight"][:, 1] = 1.0
    _zero_residual_writes(weights, [1])
    weights["model.norm.weight"][1] = 1.0
    head = weights["lm_head.weight"]
    head[:, 1] = 0.0
    head[tokenizer_size:, 1] = -40.0
    for token in also:
        head[token, 1] = -40.0


def force_first_token(weights: dict[str, torch.Tensor], config: VitaConfig, trigger_id: int, target_id: int) -> None:
    """Make `target_id` the next token after `trigger_id` (the template's last token) and never after others.

    Residual dimension 0 carries a sign flag: +1 in the trigger token's embedding, −1 in all others,
    and no layer writes to it (row 0 of every output projection is zero), so after the final norm it
    still has that sign. Only `lm_head[target]` reads dimension 0, with a large weight.
    """
    embed = weights["model.embed_tokens.weight"]
    embed[:, 0] = -1.0
    embed[trigger_id, 0] = 1.0
    _zero_residual_writes(weights, [0])
    weights["model.norm.weight"][0] = 1.0
    head = weights["lm_head.weight"]
    head[:, 0] = 0.0
    head[target_id, :] = 0.0
    head[target_id, 0] = 40.0


def feature_extractor_config(seed: int = 0) -> dict:
    """CMVN statistics of plausible magnitude (log-mel means ~10, inverse std ~0.25)."""
    rng = np.random.default_rng(seed)
    return {
        "feature_extractor_type": "VitaAudioFeatureExtractor",
        "feature_size": 80,
        "sampling_rate": 16000,
        "frame_length": 25,
        "frame_shift": 10,
        "dither": 0.0,
        "cmvn_means": [float(v) for v in 10.0 + rng.normal(0, 1.0, 80)],
        "cmvn_istds": [float(v) for v in 0.25 + rng.uniform(0, 0.05, 80)],
    }


def build_tiny(
    layout: Layout,
    out_dir: str | Path,
    *,
    seed: int = 0,
    force: ForcedToken | None = None,
    never_stop: bool = False,
    config_format: TinyFormat = "vita",
    vision_tower: str | None = None,
    audio_encoder: str | None = None,
    tts: bool | None = None,
) -> Path:
    """Write a complete tiny checkpoint to `out_dir` and return it.

    `never_stop` bans EOS, so every answer runs to max_tokens (long, predictable answers for tests).
    `config_format` writes the same tensors under another published config format (see
    `models.checkpoint`): "training" also writes the two tower repos beside `out_dir`
    (`<name>-InternViT/`, `<name>-AudioEnc/`) and names them in `mm_vision_tower`/`mm_audio_encoder`,
    unless `vision_tower`/`audio_encoder` give other locations (hub ids, say). `tts` writes a tiny speech decoder
    in `vita_tts_ckpt/` (default: for VITA-1.5, which publishes one; see `models.vita_tts.tiny`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(layout, out)
    config = tiny_config(layout, out)
    weights = random_weights(config, seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    banned = (int(config.eos_token_id),) if never_stop else ()
    mask_untokenizable_rows(weights, len(tokenizer), also=banned)
    if force is not None:
        last = "assistant\n" if layout == "vita15" else "bot:"
        trigger = tokenizer.encode(last, add_special_tokens=False)[-1]
        force_first_token(weights, config, trigger, config.state_token_ids[force])
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    config.save_pretrained(str(out))
    (out / "feature_extractor").mkdir(exist_ok=True)
    (out / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps(feature_extractor_config(seed), indent=1)
    )
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": config.eos_token_id}))
    if (layout == "vita15") if tts is None else tts:
        from .vita_tts.tiny import build_tiny_tts, tiny_decoder_config

        # The speech decoder reads the LLM's embedding rows cut into vectors of its width.
        build_tiny_tts(out / "vita_tts_ckpt", seed=seed,
                       decoder=tiny_decoder_config(hidden=config.get_text_config().hidden_size // 2))
    if config_format == "training":
        vision_dir, audio_dir = write_tiny_towers(config, out.parent / f"{out.name}-InternViT",
                                                  out.parent / f"{out.name}-AudioEnc", seed)
        raw = training_config(config, vision_tower or str(vision_dir.resolve()),
                              audio_encoder or str(audio_dir.resolve()))
        (out / "config.json").write_text(json.dumps(raw, indent=1))
        shutil.rmtree(out / "feature_extractor")  # the model repos have none: CMVN is in the weights
    elif config_format == "port":
        (out / "config.json").write_text(json.dumps(port_config(config), indent=1))
        extractor = {**feature_extractor_config(seed), **_PORT_EXTRACTOR_EXTRAS}
        (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(extractor, indent=1))
    return out


# --- the other published config formats (field sets as in VITA's public repository) ------------------------

_PORT_EXTRACTOR_EXTRAS = {
    "feature_extractor_type": "WhaleFeatureExtractor", "num_mel_bins": 80, "dither": 1.0, "cmvn_preload": True,
    "do_ceptral_normalize": True, "normalize_means": True, "normalize_vars": True, "padding_side": "right",
    "padding_value": 0.0, "return_attention_mask": True,
    "auto_map": {"AutoFeatureExtractor": "processor_whale.WhaleFeatureExtractor"},  # never run: data only
}
_TEXT_META_KEYS = ("architectures", "model_type", "transformers_version", "_name_or_path")


def _text_fields(config: VitaConfig) -> dict:
    return {k: v for k, v in config.get_text_config().to_dict().items() if k not in _TEXT_META_KEYS}


def _vision_fields(config: VitaConfig) -> dict:
    v = config.vision_config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "layer_norm_eps", "qkv_bias", "hidden_act")
    return {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "norm_type": "layer_norm", "qk_normalization": False, **{k: getattr(v, k) for k in keys}}


def training_config(config: VitaConfig, vision_tower: str, audio_encoder: str) -> dict:
    """The model repos' config.json: the text model's own fields, flat, plus what VITA's training adds."""
    model_type, arch = (("vita-Qwen2", "VITAQwen2ForCausalLM") if config.layout == "vita15"
                        else ("vita-mixtral", "VITAMixtralForCausalLM"))
    return {
        "architectures": [arch], "model_type": model_type, **_text_fields(config),
        "mm_vision_tower": vision_tower, "mm_audio_encoder": audio_encoder, "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": config.vision_config.hidden_size, "use_mm_proj": True,
        "freeze_audio_encoder": True, "freeze_audio_encoder_adapter": False, "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False, "image_aspect_ratio": "square", "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 6200, "transformers_version": "4.43.1",
    }


def port_config(config: VitaConfig) -> dict:
    """VITA's vLLM port config.json: text/vision/audio sub-configs, and its 51000/51001 placeholder words."""
    a = config.audio_config
    multimodal, arch = (("qwen2_multimodal", "Qwen2ForConditionalGeneration") if config.layout == "vita15"
                        else ("mixtral_multimodal", "MixtralForConditionalGeneration"))
    text_arch = "Qwen2ForCausalLM" if config.layout == "vita15" else "MixtralForCausalLM"
    text = _text_fields(config)
    return {
        "architectures": [arch], "model_type": multimodal, "image_token_index": 51000, "audio_token_index": 51001,
        "auto_map": {"AutoConfig": f"configuration_{multimodal}.Config"},  # never run: data only
        "text_config": {"architectures": [text_arch], "model_type": config.get_text_config().model_type, **text},
        "vision_config": _vision_fields(config),
        "audio_config": {
            "architectures": ["WhaleAudioModel"], "model_type": "whale", "input_dim": a.input_dim,
            "hidden_size": a.hidden_size, "num_hidden_layers": a.num_hidden_layers,
            "num_attention_heads": a.num_attention_heads, "intermediate_size": a.intermediate_size,
            "max_position_embeddings": a.max_position, "use_relative_pe": True, "normalize_before": True,
            "hidden_act": "relu",
        },
        "downsample_ratio": config.downsample_ratio, "dynamic_image_size": True,
        "max_dynamic_patch": config.max_dynamic_patch, "min_dynamic_patch": config.min_dynamic_patch,
        "use_thumbnail": config.use_thumbnail, "vision_feature_layer": -1, "projector_hidden_act": "gelu",
        "audio_projector_hidden_act": "gelu", "tokenizer_model_max_length": 4600,
        "vocab_size": config.get_text_config().vocab_size,
    }


def train_yaml(config: VitaConfig) -> str:
    """The audio encoder repo's `train.yaml`, in upstream's structure (whale `init_model`: `encoder_conf` with an
    overview and one parameter block per component, the adapter in `model_conf`, the front end in
    `dataset_conf`). Dynamic chunks, as the published encoder was trained with."""
    import yaml

    a = config.audio_config
    h = a.hidden_size
    doc = {
        "input_dim": a.input_dim,
        "is_json_cmvn": True,
        "encoder_conf": {
            "overview_conf": {"encoder-layer-config": "subsampling-transformer", "encoder-input-dim": a.input_dim,
                              "encoder-output-dim": h},
            "para_conf": {
                "subsampling": {"subsampling-rate": 4, "subsampling-input-dim": a.input_dim,
                                "subsampling-output-dim": h, "subsampling-dropout-rate": 0.1},
                "transformer": {
                    "transformer-input-dim": h, "transformer-output-dim": h, "transformer-attention-dim": h,
                    "transformer-attention-heads": a.num_attention_heads,
                    "transformer-linear-units": a.intermediate_size,
                    "transformer-num-blocks": a.num_hidden_layers, "transformer-dropout-rate": 0.1,
                    "transformer-attention-dropout-rate": 0.0, "transformer-positional-dropout-rate": 0.1,
                    "transformer-input-layer": "linear", "transformer-pos-enc-class": "rel-enc",
                    "transformer-normalize-before": True, "transformer-concat-after": False,
                    "transformer-positionwise-layer-type": "linear", "transformer-chunk_size": -1,
                    "transformer-left_chunks": -1, "transformer-dynamic-chunks": True,
                },
            },
        },
        "model_conf": {"adpter_type": "subsampling", "enc_out_dim": h,
                       "llm_embed_dim": config.get_text_config().hidden_size,
                       "kernel_size": a.adapter_kernel_size, "activation_func": "gelu", "norm": "layer"},
        "dataset_conf": {"resample_conf": {"resample_rate": 16000},
                         "fbank_conf": {"num_mel_bins": a.input_dim, "frame_length": 25, "frame_shift": 10,
                                        "dither": 1.0}},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def write_tiny_towers(config: VitaConfig, vision_dir: Path, audio_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """The two tower repos a training config names: InternViT's config.json; the audio encoder's
    `train.yaml` and WeNet `global_cmvn` (its `final.pt` weights are in the main checkpoint too)."""
    vision_dir.mkdir(parents=True, exist_ok=True)
    (vision_dir / "config.json").write_text(json.dumps(_vision_fields(config), indent=1))
    audio_dir.mkdir(parents=True, exist_ok=True)
    (audio_dir / "train.yaml").write_text(train_yaml(config))
    cmvn = feature_extractor_config(seed)
    frames = 100000
    means = np.asarray(cmvn["cmvn_means"], dtype=np.float64)
    variances = 1.0 / np.asarray(cmvn["cmvn_istds"], dtype=np.float64) ** 2
    wenet = {"mean_stat": list(means * frames), "var_stat": list((variances + means**2) * frames), "frame_num": frames}
    (audio_dir / "global_cmvn").write_text(json.dumps(wenet))
    return vision_dir, audio_dir
