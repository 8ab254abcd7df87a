"""Open a published VITA checkpoint as it is: where it lives, which config format it speaks, one VitaConfig.

`--model` takes what `vllm serve` takes: a local directory, or a hub id (`VITA-MLLM/VITA-1.5`, or
`owner/name/subfolder` for a checkpoint inside a folder of its repo). Hub ids resolve through
`huggingface_hub`: downloaded when online, read from the local HF cache when `HF_HUB_OFFLINE=1`.

Three config formats are read, and converted in memory (a user's files are never rewritten):
- **vita**: ours (`model_type: vita`, text/vision/audio sub-configs, placeholder and state-token ids);
- **training**: the model repos' own `config.json` (VITA-1.5 `vita-Qwen2` / VITA-1.0 `vita-mixtral`): a flat
  text-model config plus `mm_*` keys naming the vision tower and audio encoder repos;
- **port**: VITA's own vLLM port (`web_demo/vllm_tools/*_model_weight_file/config.json`,
  `qwen2_multimodal` / `mixtral_multimodal`), with text/vision/audio sub-configs and a feature extractor.
- **text**: a plain text LLM (`architectures: [...ForCausalLM]`, no towers) whose tokenizer speaks ChatML
  (`<|im_start|>` / `<|im_end|>`, as Qwen2 / Qwen2.5 / SmolLM2): served by vLLM as it is, prompted with
  VITA-1.5's template, hearing through input transcription and seeing nothing (a cascade voice agent).

Every value that is not in the file comes from somewhere named: a tower repo's config, the audio encoder's
`train.yaml` and `global_cmvn`, the tensors' shapes (read from the safetensors headers, nothing loaded),
or the published defaults. `Checkpoint.sources` says which, for the log and `vita-duplex inspect`.
Nothing from a checkpoint is ever executed: `auto_map` code is ignored, YAML is read with `safe_load`.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .config import VITA_ARCHITECTURE, Layout, VitaConfig, register_config
from .state_tokens import STATE_TOKEN_TEXT
from .state_tokens import state_token_ids as _tokenizer_state_ids
from .vita_tts.config import CODEC_DIR, CONFIG_FILE, DECODER_DIR, TTS_DIR, WEIGHTS_FILE

log = logging.getLogger(__name__)

ConfigFormat = Literal["vita", "training", "port", "text"]

# Training format: model_type -> (layout, text model_type, text architecture).
TRAINING_MODEL_TYPES: dict[str, tuple[Layout, str, str]] = {
    "vita-Qwen2": ("vita15", "qwen2", "Qwen2ForCausalLM"),
    "vita-mixtral": ("vita10", "mixtral", "MixtralForCausalLM"),
}
# VITA's vLLM port: model_type -> layout.
PORT_MODEL_TYPES: dict[str, Layout] = {"qwen2_multimodal": "vita15", "mixtral_multimodal": "vita10"}
PORT_ARCHITECTURES: dict[str, Layout] = {
    "Qwen2ForConditionalGeneration": "vita15", "MixtralForConditionalGeneration": "vita10",
}
ACCEPTED_MODEL_TYPES = ("vita", *TRAINING_MODEL_TYPES, *PORT_MODEL_TYPES)
# A plain text checkpoint is prompted with VITA-1.5's ChatML template: these must be single tokens.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_TOWER_KEYS = ("mm_vision_tower", "mm_audio_encoder", "vision_config", "audio_config", "text_config")

# Keys of the training config that describe the towers or the training run, not the text model.
_TRAINING_ONLY_KEYS = re.compile(
    r"^(mm_.*|freeze_.*|tune_.*|use_mm_proj|image_aspect_ratio|tokenizer_.*|audio_prompt_.*|"
    r"continuous_training|auto_map|architectures|model_type|_name_or_path|transformers_version|use_s2)$"
)

# The published towers (InternViT-300M-448px, the whale encoder); used for what neither a tower repo nor
# the tensors say. Head counts cannot be read from InternViT's fused qkv weights.
PUBLISHED_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "image_size": 448, "patch_size": 14, "layer_norm_eps": 1e-6,
                    "qkv_bias": True}
PUBLISHED_AUDIO = {"input_dim": 80, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096, "max_position": 5000, "adapter_hidden_size": 2048,
                   "adapter_kernel_size": 5}
CMVN_PREFIX = "model.audio_encoder.encoder.global_cmvn."
# Two CMVN sources "agree" within this relative tolerance (bf16 storage of a buffer is not a disagreement
# worth a warning only if it stays this close; float32 vs the JSON's float64 always is).
CMVN_RTOL = 1e-3


class CheckpointError(ValueError):
    """The checkpoint cannot be served as it is; the message names the file or value and what is accepted."""


@dataclass
class Checkpoint:
    spec: str  # what the operator gave: a directory or a hub id
    path: Path  # the local directory holding config, tokenizer and weights
    config_format: ConfigFormat
    config: VitaConfig
    sources: dict[str, str] = field(default_factory=dict)  # what -> where it came from
    warnings: list[str] = field(default_factory=list)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    raw_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None

    def log_sources(self, logger: logging.Logger = log) -> None:
        logger.info("checkpoint %s -> %s (config format %s, layout %s)", self.spec, self.path,
                    self.config_format, self.config.layout)
        for what, source in self.sources.items():
            logger.info("  %s: %s", what, source)
        for warning in self.warnings:
            logger.warning("checkpoint %s: %s", self.spec, warning)


# --- where the checkpoint is ------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._/-]+)?$")
# What a model snapshot needs; weights only as safetensors (never pickles), no code.
_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.yaml", "*.jinja"]
# One exception: VITA-1.5's voice, whose two weight files are pickles (`final.pt`). They are fetched by their exact
# names only, and only ever read with `torch.load(weights_only=True)` (models.vita_tts.weights), which refuses
# anything but tensors, dicts, lists and numbers: no code runs from them.
_VOICE_FILES = [f"{TTS_DIR}/{part}/{name}" for part in (DECODER_DIR, CODEC_DIR)
                for name in (CONFIG_FILE, WEIGHTS_FILE)]


def snapshot_patterns(sub: str = "") -> list[str]:
    """`allow_patterns` of a hub snapshot (fnmatch, where `*` also matches `/`): the model files of the
    checkpoint folder `sub` (the whole repo when empty), and the voice's four files in `vita_tts_ckpt/` inside
    that folder or beside it (VITA-MLLM/VITA-1.5 keeps `VITA1.5_ckpt/` and `vita_tts_ckpt/` at its root)."""
    if not sub:
        return [*_MODEL_FILES, *_VOICE_FILES, *(f"*/{v}" for v in _VOICE_FILES)]
    parent = sub.rsplit("/", 1)[0] + "/" if "/" in sub else ""
    return [*(f"{sub}/{p}" for p in _MODEL_FILES), *(f"{sub}/{v}" for v in _VOICE_FILES),
            *(f"{parent}{v}" for v in _VOICE_FILES)]


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def resolve_model_dir(spec: str | Path) -> Path:
    """A local checkpoint directory for `spec` (a directory, or a hub id resolved through huggingface_hub)."""
    path = Path(spec).expanduser()
    if path.exists():
        return _checkpoint_root(path, str(spec))
    text = str(spec)
    if not is_hub_id(text):
        raise CheckpointError(f"model {text!r} is neither a directory nor a hub id (owner/name)")
    parts = text.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    local = Path(_snapshot(repo, snapshot_patterns(sub)))
    return _checkpoint_root(local / sub if sub else local, text)


def _snapshot(repo: str, patterns: list[str] | None = None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id=repo, allow_patterns=patterns)
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"hub model {repo!r} is not in the local HF cache and cannot be downloaded "
            f"(offline, or HF_HUB_OFFLINE=1): {exc}"
        ) from exc
    except Exception as exc:  # RepositoryNotFoundError, HTTP errors, ...
        raise CheckpointError(f"could not fetch hub model {repo!r}: {exc}") from exc


def _checkpoint_root(path: Path, spec: str) -> Path:
    """The directory with config.json: `path` itself, or its only subfolder that has one (the model repos
    keep the checkpoint in a folder such as `VITA1.5_ckpt/`)."""
    if not path.is_dir():
        raise CheckpointError(f"model {spec!r}: {path} is not a directory")
    if (path / "config.json").is_file():
        return path
    candidates = sorted(p.parent for p in path.glob("*/config.json"))
    if len(candidates) == 1:
        log.info("model %s: using the checkpoint in %s", spec, candidates[0])
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise CheckpointError(
        f"model {spec!r}: {path} has no config.json (subfolders with one: {found}); "
        "name the checkpoint folder, e.g. owner/name/folder"
    )


def resolve_repo_file(location: str, filename: str) -> Path | None:
    """`filename` inside a tower location (a local directory or a hub id), or None when not available."""
    path = Path(location).expanduser()
    if path.is_dir():
        candidate = path / filename
        return candidate if candidate.is_file() else None
    if not is_hub_id(location):
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=location, filename=filename))
    except Exception as exc:  # noqa: BLE001 - offline without it in the cache, no such file, no network: optional
        log.debug("tower file %s/%s not available: %s", location, filename, exc)
        return None


# --- tensors ------------------------------------------------------------------------------------------------


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (nothing is loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        for name, info in _safetensors_header(file).items():
            if name != "__metadata__":
                shapes[name] = tuple(int(d) for d in info["shape"])
    return shapes


def _safetensors_header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > 100 << 20:
            raise CheckpointError(f"{file}: safetensors header of {size} bytes is not plausible")
        return json.loads(handle.read(size))


def read_tensors(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """Just these tensors, as float32 numpy (used for the CMVN buffers)."""
    from safetensors import safe_open

    found: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in names & set(handle.keys()):
                found[name] = handle.get_tensor(name).float().numpy()
    return found


# --- the config ---------------------------------------------------------------------------------------------


def detect_format(raw: Mapping[str, Any]) -> tuple[ConfigFormat, Layout | None]:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type == "vita":
        return "vita", raw.get("layout", "vita15")
    if model_type in TRAINING_MODEL_TYPES:
        return "training", TRAINING_MODEL_TYPES[model_type][0]
    if model_type in PORT_MODEL_TYPES:
        return "port", PORT_MODEL_TYPES[model_type]
    for arch in architectures:
        if arch in PORT_ARCHITECTURES and "text_config" in raw:
            return "port", PORT_ARCHITECTURES[arch]
    if (isinstance(model_type, str) and any(str(a).endswith("ForCausalLM") for a in architectures)
            and not any(key in raw for key in _TOWER_KEYS)):
        return "text", "vita15"  # a plain text LLM: ChatML, as VITA-1.5's template
    raise CheckpointError(
        f"config.json model_type {model_type!r} (architectures {architectures}) is neither a VITA checkpoint "
        f"(accepted model types: {', '.join(ACCEPTED_MODEL_TYPES)}) nor a plain text LLM (architectures "
        "ending in ForCausalLM, no vision/audio towers)"
    )


def open_checkpoint(spec: str | Path, tokenizer: Any = None) -> Checkpoint:
    """Resolve, read and convert a checkpoint; raises CheckpointError with a clear message when it cannot."""
    path = resolve_model_dir(spec)
    raw = _read_json(path / "config.json")
    config_format, layout = detect_format(raw)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    shapes = tensor_shapes(path)
    ckpt = Checkpoint(spec=str(spec), path=path, config_format=config_format, config=VitaConfig(),
                      tensor_shapes=shapes, raw_config=dict(raw), tokenizer=tokenizer)
    ckpt.sources["config"] = f"{path / 'config.json'} ({config_format} format)"
    if config_format == "text":
        ckpt.config = _from_text(raw, tokenizer, ckpt)
        return ckpt
    if config_format == "vita":
        register_config()
        config = VitaConfig.from_pretrained(str(path))
    elif config_format == "training":
        config = _from_training(raw, layout, shapes, ckpt)  # type: ignore[arg-type]
    else:
        config = _from_port(raw, layout, shapes, ckpt)  # type: ignore[arg-type]
    ckpt.config = config
    _set_cmvn(ckpt)
    if config_format != "vita":  # ours carries its ids (none for a model trained without state tokens)
        _set_token_ids(ckpt, tokenizer)
    config.validate_placeholders(len(tokenizer))
    config.architectures = [VITA_ARCHITECTURE]
    config.config_format = config_format
    return ckpt


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    # The tokenizer loader reads config.json with the generic config class, which warns about every model type
    # it does not know ("vita-Qwen2", ...): noise for an operator, since we read that file ourselves.
    quiet = logging.getLogger("transformers.configuration_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"could not load the tokenizer from {path}: {exc}") from exc
    finally:
        quiet.setLevel(level)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return data


def _from_training(raw: Mapping[str, Any], layout: Layout, shapes: Mapping[str, tuple[int, ...]],
                   ckpt: Checkpoint) -> VitaConfig:
    _, text_type, text_arch = TRAINING_MODEL_TYPES[str(raw["model_type"])]
    text = {k: v for k, v in raw.items() if not _TRAINING_ONLY_KEYS.match(k)}
    text.update(model_type=text_type, architectures=[text_arch])
    ckpt.sources["text_config"] = "config.json (flat training fields)"
    vision = _vision_config(raw.get("mm_vision_tower"), shapes, ckpt)
    audio = _audio_config(raw.get("mm_audio_encoder"), shapes, ckpt)
    return VitaConfig(text_config=text, vision_config=vision, audio_config=audio, layout=layout,
                      tie_word_embeddings=bool(text.get("tie_word_embeddings", False)), dtype=_stored_dtype(text))


def _from_port(raw: Mapping[str, Any], layout: Layout, shapes: Mapping[str, tuple[int, ...]],
               ckpt: Checkpoint) -> VitaConfig:
    text = dict(raw.get("text_config") or {})
    if not text:
        raise CheckpointError("port config.json has no text_config")
    text.setdefault("model_type", "qwen2" if layout == "vita15" else "mixtral")
    ckpt.sources["text_config"] = "config.json text_config"
    v = raw.get("vision_config") or {}
    vision = {k: v[k] for k in PUBLISHED_VISION if k in v}
    a = raw.get("audio_config") or {}
    audio = {k: a[k] for k in PUBLISHED_AUDIO if k in a}
    if "max_position_embeddings" in a:
        audio["max_position"] = a["max_position_embeddings"]
    ckpt.sources["vision_config"] = "config.json vision_config"
    ckpt.sources["audio_config"] = "config.json audio_config"
    _fill_from_shapes(vision, _vision_from_shapes(shapes), "vision", ckpt)
    _fill_from_shapes(audio, _audio_from_shapes(shapes), "audio", ckpt)
    for key in ("image_token_index", "audio_token_index"):
        if key in raw:
            ckpt.sources[key] = f"ignored the port's {raw[key]} (a word of the vocabulary); a safe row is used"
    top = {k: raw[k] for k in ("downsample_ratio", "min_dynamic_patch", "max_dynamic_patch", "use_thumbnail")
           if k in raw}
    return VitaConfig(text_config=text, vision_config=vision, audio_config=audio, layout=layout,
                      dtype=_stored_dtype(text), **top)


def _from_text(raw: Mapping[str, Any], tokenizer: Any, ckpt: Checkpoint) -> VitaConfig:
    """A plain text LLM: no towers (both marked untrained, so the server hears through transcripts and drops
    vision), no placeholders, no state tokens. Its own config goes to vLLM unchanged (`VitaEngine`)."""
    added = tokenizer.get_added_vocab()
    missing = [t for t in CHATML_TOKENS if t not in added
               and len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        raise CheckpointError(
            f"plain text checkpoint {ckpt.path}: its tokenizer has no {' / '.join(missing)} token; a text LLM is "
            "served with VITA-1.5's ChatML template (<|im_start|>role ... <|im_end|>), as Qwen2, Qwen2.5 and "
            "SmolLM2 are trained")
    text = {k: v for k, v in raw.items() if k not in ("auto_map", "_name_or_path", "transformers_version")}
    config = VitaConfig(text_config=text, layout="vita15", state_token_ids={}, dtype=_stored_dtype(text),
                        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
                        audio_tower_trained=False, vision_tower_trained=False,
                        eos_token_id=text.get("eos_token_id"))
    config.config_format = "text"
    ckpt.sources["text_config"] = "config.json (a plain text LLM, served by vLLM as it is)"
    ckpt.sources["towers"] = "none: speech is heard through input transcription, images and video are dropped"
    ckpt.sources["state tokens"] = "none (not a VITA model): empty transcripts are noise, the rest is answered"
    return config


def _stored_dtype(text: Mapping[str, Any]) -> Any:
    """The weights' dtype as the text config states it (vLLM's dtype "auto" serves that: bf16 for VITA)."""
    return text.get("torch_dtype") or text.get("dtype")


def _vision_config(location: Any, shapes: Mapping[str, tuple[int, ...]], ckpt: Checkpoint) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if isinstance(location, str) and location:
        file = resolve_repo_file(location, "config.json")
        if file is not None:
            tower = _read_json(file)
            tower = tower.get("vision_config", tower)  # InternVL-style repos nest it
            values = {k: tower[k] for k in PUBLISHED_VISION if k in tower}
            ckpt.sources["vision_config"] = f"mm_vision_tower {location} ({file})"
        else:
            ckpt.sources["vision_config"] = f"mm_vision_tower {location} not available: tensor shapes + defaults"
    else:
        ckpt.sources["vision_config"] = "no mm_vision_tower: tensor shapes + published defaults"
    _fill_from_shapes(values, _vision_from_shapes(shapes), "vision", ckpt)
    return values


def _audio_config(location: Any, shapes: Mapping[str, tuple[int, ...]], ckpt: Checkpoint) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if isinstance(location, str) and location:
        yaml_file = resolve_repo_file(location, "train.yaml")
        if yaml_file is not None:
            from .audio_encoder_config import audio_config_from_train_yaml

            values, notes = audio_config_from_train_yaml(yaml_file)
            ckpt.sources["audio_config"] = f"mm_audio_encoder {location} ({yaml_file})"
            if notes:
                ckpt.sources["audio_config notes"] = "; ".join(notes)
        else:
            ckpt.sources["audio_config"] = f"mm_audio_encoder {location} has no train.yaml here: tensor shapes + defaults"
        cmvn_file = resolve_repo_file(location, "global_cmvn")
        if cmvn_file is not None:
            ckpt.raw_config["_global_cmvn_file"] = str(cmvn_file)
    else:
        ckpt.sources["audio_config"] = "no mm_audio_encoder: tensor shapes + published defaults"
    _fill_from_shapes(values, _audio_from_shapes(shapes), "audio", ckpt)
    return values


def _fill_from_shapes(values: dict[str, Any], from_shapes: Mapping[str, Any], tower: str, ckpt: Checkpoint) -> None:
    """Shapes win over nothing and are checked against what a file said; the rest is the published default."""
    defaults = PUBLISHED_VISION if tower == "vision" else PUBLISHED_AUDIO
    for key, default in defaults.items():
        if key in values:
            if key in from_shapes and from_shapes[key] != values[key]:
                ckpt.warnings.append(
                    f"{tower} {key}: the config says {values[key]}, the tensors say {from_shapes[key]}; "
                    "using the tensors")
                values[key] = from_shapes[key]
            continue
        if key in from_shapes:
            values[key] = from_shapes[key]
            ckpt.sources[f"{tower} {key}"] = f"{from_shapes[key]} from the tensor shapes"
        else:
            values[key] = default
            ckpt.sources[f"{tower} {key}"] = f"{default} (published default)"


def _count_layers(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int | None:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for name in shapes if (m := pattern.match(name))}
    return max(indices) + 1 if indices else None


def _vision_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    p = "model.vision_tower.vision_tower."
    out: dict[str, Any] = {}
    if (patch := shapes.get(p + "embeddings.patch_embedding.weight")) is not None:
        out["hidden_size"], out["patch_size"] = patch[0], patch[2]
        if (pos := shapes.get(p + "embeddings.position_embedding")) is not None:
            grid = round((pos[1] - 1) ** 0.5)
            out["image_size"] = grid * patch[2]
    if (fc1 := shapes.get(p + "encoder.layers.0.mlp.fc1.weight")) is not None:
        out["intermediate_size"] = fc1[0]
    if (layers := _count_layers(shapes, p + "encoder.layers.")) is not None:
        out["num_hidden_layers"] = layers
    return out


def _audio_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    p = "model.audio_encoder.encoder."
    out: dict[str, Any] = {}
    if (mean := shapes.get(p + "global_cmvn.mean")) is not None:
        out["input_dim"] = mean[0]
    if (embed := shapes.get(p + "enc.1.embed.0.weight")) is not None:
        out["hidden_size"] = embed[0]
    if (bias_u := shapes.get(p + "enc.1.encoders.0.self_attn.pos_bias_u")) is not None:
        out["num_attention_heads"] = bias_u[0]  # (heads, head_dim): the one place the head count shows
    if (w1 := shapes.get(p + "enc.1.encoders.0.feed_forward.w_1.weight")) is not None:
        out["intermediate_size"] = w1[0]
    if (layers := _count_layers(shapes, p + "enc.1.encoders.")) is not None:
        out["num_hidden_layers"] = layers
    if (conv := shapes.get("model.audio_encoder.adpter.conv1d2.weight")) is not None:
        out["adapter_hidden_size"], out["adapter_kernel_size"] = conv[0], conv[2]
    return out


# --- CMVN ---------------------------------------------------------------------------------------------------


def _set_cmvn(ckpt: Checkpoint) -> None:
    """Upstream's encoder subtracts and multiplies its own `global_cmvn` buffers: they come first; then the
    audio encoder repo's WeNet `global_cmvn`; then a feature-extractor JSON (the port's, or ours)."""
    candidates: list[tuple[str, np.ndarray, np.ndarray]] = []
    names = {CMVN_PREFIX + "mean", CMVN_PREFIX + "istd"}
    if names <= set(ckpt.tensor_shapes):
        buffers = read_tensors(ckpt.path, names)
        candidates.append(("the checkpoint's global_cmvn buffers", buffers[CMVN_PREFIX + "mean"],
                           buffers[CMVN_PREFIX + "istd"]))
    if cmvn_file := ckpt.raw_config.pop("_global_cmvn_file", None):
        from .audio_encoder_config import global_cmvn_from_wenet_json

        means, istds = global_cmvn_from_wenet_json(Path(cmvn_file))
        candidates.append((f"global_cmvn of the audio encoder repo ({cmvn_file})", np.asarray(means),
                           np.asarray(istds)))
    extractor = ckpt.path / "feature_extractor" / "preprocessor_config.json"
    if extractor.is_file():
        data = _read_json(extractor)
        if "cmvn_means" in data and "cmvn_istds" in data:
            candidates.append((f"feature extractor {extractor}", np.asarray(data["cmvn_means"], dtype=np.float64),
                               np.asarray(data["cmvn_istds"], dtype=np.float64)))
    if not candidates:
        raise CheckpointError(
            f"no CMVN statistics for the audio encoder in {ckpt.path}: expected the checkpoint's "
            f"{CMVN_PREFIX}mean/istd tensors, the audio encoder repo's global_cmvn, or "
            "feature_extractor/preprocessor_config.json with cmvn_means/cmvn_istds"
        )
    source, means, istds = candidates[0]
    dim = ckpt.config.audio_config.input_dim
    if means.shape != (dim,) or istds.shape != (dim,):
        raise CheckpointError(f"CMVN from {source} has shapes {means.shape}/{istds.shape}; expected ({dim},)")
    if not (np.isfinite(means).all() and np.isfinite(istds).all()):
        raise CheckpointError(f"CMVN from {source} holds non-finite values")
    for other, m, s in candidates[1:]:
        if m.shape != means.shape or not (np.allclose(m, means, rtol=CMVN_RTOL, atol=1e-4)
                                          and np.allclose(s, istds, rtol=CMVN_RTOL, atol=1e-4)):
            ckpt.warnings.append(f"CMVN from {source} and from {other} disagree; using {source}")
    ckpt.config.audio_config.cmvn_means = [float(v) for v in means]
    ckpt.config.audio_config.cmvn_istds = [float(v) for v in istds]
    ckpt.sources["cmvn"] = source


# --- token ids ----------------------------------------------------------------------------------------------


def _set_token_ids(ckpt: Checkpoint, tokenizer: Any) -> None:
    """Placeholders on the last two embedding rows, which the tokenizer never produces; state tokens and
    eos from the tokenizer."""
    config = ckpt.config
    text = config.get_text_config()
    vocab = int(text.vocab_size)
    embed = ckpt.tensor_shapes.get("model.embed_tokens.weight")
    if embed is not None and embed[0] != vocab:
        raise CheckpointError(f"model.embed_tokens.weight has {embed[0]} rows but vocab_size is {vocab}")
    if len(tokenizer) > vocab - 2:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens and the embedding {vocab} rows: no free row is left for "
            "the image/audio placeholders (VITA's own 51000/51001 are words, never used here)")
    if config.image_token_index < 0 or config.audio_token_index < 0:
        config.image_token_index, config.audio_token_index = vocab - 2, vocab - 1
        ckpt.sources["placeholders"] = f"image {vocab - 2}, audio {vocab - 1} (the last embedding rows)"
    config.state_token_ids = state_token_ids(tokenizer, config.layout)
    ckpt.sources["state tokens"] = ", ".join(
        f"{kind} {STATE_TOKEN_TEXT[config.layout][kind]}={i}" for kind, i in config.state_token_ids.items())
    if getattr(config, "eos_token_id", None) is None and text.eos_token_id is not None:
        config.eos_token_id = text.eos_token_id


def state_token_ids(tokenizer: Any, layout: str) -> dict[str, int]:
    """The state tokens' ids from the checkpoint's tokenizer; each must be ONE token (VITA-1.0: added tokens)."""
    try:
        return _tokenizer_state_ids(tokenizer, layout)
    except ValueError as exc:
        raise CheckpointError(f"{exc}. Is this the checkpoint's own tokenizer?") from exc


def audio_feature_extractor(config: VitaConfig) -> Any:
    """The fbank + CMVN front end for this checkpoint (dither 0: the published 1.0 is a training augmentation)."""
    from .audio_features import AudioFeatureExtractor

    audio = config.audio_config
    if audio.cmvn_means is None or audio.cmvn_istds is None:
        raise CheckpointError("the config carries no CMVN; open the checkpoint with models.checkpoint.open_checkpoint")
    return AudioFeatureExtractor(cmvn_means=audio.cmvn_means, cmvn_istds=audio.cmvn_istds,
                                 num_mel_bins=audio.input_dim)


def vllm_config_parser() -> type:
    """vLLM's config parser for `config_format="vita"`: every published format becomes one VitaConfig, in
    memory, in whichever vLLM process reads the config (registered by `models.plugin`)."""
    from vllm.transformers_utils.config_parser_base import ConfigParserBase

    class VitaConfigParser(ConfigParserBase):
        def parse(self, model: str | Path, trust_remote_code: bool, revision: str | None = None,
                  code_revision: str | None = None, **kwargs: Any) -> tuple[dict, VitaConfig]:
            ckpt = open_checkpoint(model)  # vLLM applies its hf_overrides to what this returns
            return ckpt.config.to_dict(), ckpt.config

    return VitaConfigParser


@dataclass(frozen=True)
class TensorCheck:
    """The checkpoint's tensors against the published layout for its config."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, expected, found)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> list[str]:
        lines = [f"missing: {name}" for name in self.missing[:limit]]
        lines += [f"unexpected: {name}" for name in self.unexpected[:limit]]
        lines += [f"shape mismatch: {n} expected {list(e)}, found {list(f)}" for n, e, f in self.mismatched[:limit]]
        hidden = len(self.missing) + len(self.unexpected) + len(self.mismatched) - len(lines)
        return lines + ([f"... and {hidden} more"] if hidden > 0 else [])


_TOWER_PREFIXES = ("model.vision_tower.", "model.mm_projector.", "model.audio_encoder.")


def check_tensors(ckpt: Checkpoint) -> TensorCheck:
    from .layout import checkpoint_shapes

    expected = checkpoint_shapes(ckpt.config)
    if ckpt.config_format == "text":  # a plain text LLM has the text model's tensors only
        expected = {name: shape for name, shape in expected.items() if not name.startswith(_TOWER_PREFIXES)}
    found = ckpt.tensor_shapes
    return TensorCheck(
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        mismatched=[(n, expected[n], found[n]) for n in sorted(set(expected) & set(found)) if expected[n] != found[n]],
    )
