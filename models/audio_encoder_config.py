"""Read the whale audio encoder's own files (upstream `train.yaml` and `global_cmvn`) into our settings.

VITA's training code builds the audio encoder from the audio-encoder weight directory: `train.yaml` (read by
`vita/model/multimodal_encoder/builder.py::build_audio_encoder` and `whale/init_model.py::init_model`) and
`global_cmvn` (WeNet JSON statistics, `whale/cmvn.py`). The published vLLM checkpoint carries neither (its
`audio_config` and `feature_extractor/preprocessor_config.json` hold the results), so these readers are for
converting a training-layout checkpoint. Re-implemented from reading the sources; nothing of upstream's
is run.

How upstream reads `train.yaml`:

- `input_dim` (top level) is passed to `whaleEncoder` and ignored there; the encoder's widths come from
  `encoder_conf`: `overview_conf` (`encoder-layer-config`, `encoder-input-dim`, `encoder-output-dim`) and
  `para_conf[<component>]` for each component named in `encoder-layer-config` ("subsampling-transformer").
- All of them land on ONE argparse namespace that starts at the argparse defaults: a key counts when its name,
  with `-` replaced by `_`, is an argument (others are silently ignored); the overview is applied first, then
  each component's block in order, so later blocks override earlier ones and a missing key keeps its default.
- `model_conf` holds the adapter: `adpter_type` ("subsampling" = `CNNSubsampling`), `enc_out_dim`,
  `llm_embed_dim`, `kernel_size`, `activation_func`, `norm`; missing ones take `audioEncoder`'s defaults.
- `transformer-dynamic-chunks` (argparse default True, compared with `== True`) draws a random chunk mask on
  every forward, in eval too; otherwise `transformer-chunk_size > 0` gives the static chunk mask.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["audio_config_from_train_yaml", "global_cmvn_from_wenet_json"]

# argparse defaults of whale's encoder (`add_encoder_args`, `Transformer.add_arguments`,
# `Subsampling.add_arguments`), under their namespace names. Mamba's are left out: we cannot build it.
_ENCODER_DEFAULTS: dict[str, Any] = {
    "encoder_layer_config": "tdnn-dtc",
    "encoder_input_dim": 256,
    "encoder_output_dim": 256,
    "transformer_input_dim": 256,
    "transformer_output_dim": 4,
    "transformer_attention_dim": 256,
    "transformer_attention_heads": 4,
    "transformer_linear_units": 1024,
    "transformer_num_blocks": 6,
    "transformer_dropout_rate": 0.1,
    "transformer_attention_dropout_rate": 0.0,
    "transformer_positional_dropout_rate": 0.1,
    "transformer_input_layer": "linear",
    "transformer_pos_enc_class": "abs-enc",
    "transformer_normalize_before": True,
    "transformer_concat_after": False,
    "transformer_positionwise_layer_type": "linear",
    "transformer_positionwise_conv_kernel_size": 1,
    "transformer_chunk_size": -1,
    "transformer_left_chunks": -1,
    "transformer_dynamic_chunks": True,
    "subsampling_rate": 4,
    "subsampling_input_dim": 256,
    "subsampling_output_dim": 256,
    "subsampling_dropout_rate": 0.1,
}

# `audioEncoder.__init__` defaults for the adapter keys of `model_conf`.
_ADAPTER_DEFAULTS: dict[str, Any] = {
    "adpter_type": "cnn",
    "enc_out_dim": 512,
    "llm_embed_dim": 4096,
    "kernel_size": 3,
    "activation_func": "relu",
    "norm": "batch",
}

# Every keyword `audioEncoder.__init__` takes besides `encoder` (model_conf is splatted into it).
_MODEL_CONF_KEYS = frozenset(
    {
        "llm_path",
        "freeze_llm",
        "enc_out_dim",
        "llm_embed_dim",
        "kernel_size",
        "IGNORE_ID",
        "adpter_type",
        "add_audio_bos_eos",
        "task_num",
        "task_before_audio",
        "task_type",
        "freeze_encoder",
        "freeze_adpter",
        "audio_prompt_finetune",
        "audio_prompt_num",
        "activation_func",
        "norm",
        "chat_template",
    }
)

# The keys whose upstream default we report when a file leaves them out (dropouts etc. do not matter here).
_SHAPE_KEYS = (
    "encoder_input_dim",
    "encoder_output_dim",
    "subsampling_rate",
    "subsampling_input_dim",
    "subsampling_output_dim",
    "transformer_input_dim",
    "transformer_attention_dim",
    "transformer_attention_heads",
    "transformer_linear_units",
    "transformer_num_blocks",
    "transformer_pos_enc_class",
    "transformer_chunk_size",
    "transformer_left_chunks",
    "transformer_dynamic_chunks",
)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"train.yaml: {where} must be a mapping; got {type(value).__name__}")
    return value


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"train.yaml: {name} must be an integer; got {value!r}")
    return value


def audio_config_from_train_yaml(
    path: str | Path, llm_hidden_size: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Upstream whale `train.yaml` -> (`VitaAudioConfig` fields, notes).

    The dict holds input_dim, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
    adapter_hidden_size, adapter_kernel_size, chunk_size, left_chunks. Notes say which upstream defaults
    filled missing keys, which keys upstream ignores, and how the attention mask was decided.
    Raises TypeError for a wrongly typed value, and ValueError for what our towers cannot build (another
    layer stack, abs-enc positions, a BatchNorm or ReLU adapter, inconsistent widths) and, given
    `llm_hidden_size`, for an adapter that projects to another width.
    The file is read with `yaml.safe_load`: nothing in it is executed.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    root = _mapping(data, "the document")
    notes: list[str] = []

    encoder_conf = _mapping(root.get("encoder_conf"), "encoder_conf")
    overview = _mapping(encoder_conf.get("overview_conf") or {}, "encoder_conf.overview_conf")
    para = _mapping(encoder_conf.get("para_conf") or {}, "encoder_conf.para_conf")

    args = dict(_ENCODER_DEFAULTS)
    set_keys: set[str] = set()

    def assign(block: Mapping[str, Any], where: str) -> None:
        for key, value in block.items():
            name = str(key).replace("-", "_")
            if name in args:
                args[name] = value
                set_keys.add(name)
            else:
                notes.append(f"{where}: key {key!r} is not an encoder argument; upstream ignores it")

    assign(overview, "overview_conf")
    # Upstream reads these three right after the overview, before any component block can change them.
    layer_config = args["encoder_layer_config"]
    encoder_in, encoder_out = args["encoder_input_dim"], args["encoder_output_dim"]
    components = str(layer_config).split("-")
    kinds = []
    snapshots: dict[str, dict[str, Any]] = {}
    for name in components:
        if name not in para:
            raise ValueError(
                f"train.yaml: encoder_conf.para_conf has no block {name!r} for layer config {layer_config!r}"
            )
        assign(_mapping(para[name], f"para_conf.{name}"), f"para_conf.{name}")
        parts = name.split("_")
        if len(parts) > 2:
            raise ValueError(f"train.yaml: component name {name!r} is invalid upstream (at most one '_')")
        kinds.append(parts[0])
        snapshots[parts[0]] = dict(args)  # each component is built from the namespace as it is then
    if kinds != ["subsampling", "transformer"]:
        raise ValueError(
            f"train.yaml: encoder-layer-config {layer_config!r} is not supported; accepted: "
            "'subsampling-transformer' (VITA's whale encoder)"
        )
    for key in _SHAPE_KEYS:
        if key not in set_keys:
            notes.append(f"{key} not set: upstream's default {_ENCODER_DEFAULTS[key]!r} applies")

    sub, tf = snapshots["subsampling"], snapshots["transformer"]
    if _int(sub["subsampling_rate"], "subsampling-rate") != 4:
        raise ValueError(
            f"train.yaml: subsampling-rate {sub['subsampling_rate']} is not supported; accepted: 4"
        )
    input_dim = _int(sub["subsampling_input_dim"], "subsampling-input-dim")
    hidden = _int(tf["transformer_attention_dim"], "transformer-attention-dim")
    # Upstream's own consistency checks (it exits on these), then ours: the embed Linear is hidden -> hidden.
    if _int(encoder_in, "encoder-input-dim") != input_dim:
        raise ValueError(f"train.yaml: encoder-input-dim {encoder_in} != subsampling-input-dim {input_dim}")
    sub_out = _int(sub["subsampling_output_dim"], "subsampling-output-dim")
    tf_in = _int(tf["transformer_input_dim"], "transformer-input-dim")
    if sub_out != tf_in:
        raise ValueError(f"train.yaml: subsampling-output-dim {sub_out} != transformer-input-dim {tf_in}")
    if tf_in != hidden:
        raise ValueError(
            f"train.yaml: transformer-input-dim {tf_in} != transformer-attention-dim {hidden}; "
            "our tower needs them equal"
        )
    if encoder_out != tf["transformer_output_dim"]:
        raise ValueError(
            f"train.yaml: encoder-output-dim {encoder_out} != "
            f"transformer-output-dim {tf['transformer_output_dim']}"
        )
    if tf["transformer_output_dim"] != hidden:
        notes.append(
            f"transformer-output-dim {tf['transformer_output_dim']} differs from transformer-attention-dim "
            f"{hidden}: upstream's transformer outputs attention-dim wide features regardless"
        )
    if root.get("input_dim") is not None and root.get("input_dim") != input_dim:
        notes.append(
            f"top-level input_dim {root.get('input_dim')!r} is ignored upstream; "
            f"subsampling-input-dim {input_dim} is used"
        )
    heads = _int(tf["transformer_attention_heads"], "transformer-attention-heads")
    if heads <= 0 or hidden % heads:
        raise ValueError(f"train.yaml: transformer-attention-dim {hidden} is not divisible by {heads} heads")
    unsupported = {
        "transformer-input-layer": (tf["transformer_input_layer"], "linear"),
        "transformer-pos-enc-class": (tf["transformer_pos_enc_class"], "rel-enc"),
        "transformer-positionwise-layer-type": (tf["transformer_positionwise_layer_type"], "linear"),
    }
    for key, (value, accepted) in unsupported.items():
        if value != accepted:
            raise ValueError(f"train.yaml: {key} {value!r} is not supported; accepted: {accepted!r}")
    if not tf["transformer_normalize_before"]:  # upstream tests truthiness
        raise ValueError("train.yaml: transformer-normalize-before false (post-norm) is not supported")
    if tf["transformer_concat_after"]:
        raise ValueError("train.yaml: transformer-concat-after true is not supported")

    chunk_size = _int(tf["transformer_chunk_size"], "transformer-chunk_size")
    left_chunks = _int(tf["transformer_left_chunks"], "transformer-left_chunks")
    dynamic_value = tf["transformer_dynamic_chunks"]
    dynamic = dynamic_value == True  # upstream's own test: only True (or 1) selects dynamic chunks
    if not isinstance(dynamic_value, bool):
        notes.append(
            f"transformer-dynamic-chunks is {dynamic_value!r}, not a boolean: "
            f"upstream's `== True` reads it as {dynamic}"
        )
    if dynamic:
        # Upstream draws a random chunk size on every forward, even in eval, so its output is not
        # deterministic; VITA's vLLM port and the demos it serves attend over all valid frames. So do we.
        notes.append(
            "dynamic chunks in training (random chunk mask on every forward, in eval too): full attention at "
            "inference, as VITA's vLLM port"
            + (f"; the static chunk_size {chunk_size} is ignored, as upstream does" if chunk_size > 0 else "")
        )
        chunk_size, left_chunks = -1, -1
    elif chunk_size > 0:
        notes.append(
            f"static chunk attention: chunks of {chunk_size} subsampled frames ({chunk_size * 40} ms), "
            + ("all left chunks" if left_chunks < 0 else f"{left_chunks} left chunk(s)")
        )
    else:
        notes.append("no chunk mask: full attention")
        chunk_size, left_chunks = -1, -1

    model_conf = _mapping(root.get("model_conf") or {}, "model_conf")
    unknown = sorted(set(model_conf) - _MODEL_CONF_KEYS)
    if unknown:  # upstream passes model_conf as keyword arguments: it could not build this file either
        raise ValueError(f"train.yaml: model_conf has keys audioEncoder does not take: {unknown}")
    adapter = {key: model_conf.get(key, default) for key, default in _ADAPTER_DEFAULTS.items()}
    for key, default in _ADAPTER_DEFAULTS.items():
        if key not in model_conf:
            notes.append(f"model_conf.{key} not set: upstream's default {default!r} applies")
    if adapter["adpter_type"] != "subsampling":
        raise ValueError(
            f"train.yaml: model_conf.adpter_type {adapter['adpter_type']!r} is not supported; "
            "accepted: 'subsampling'"
        )
    if adapter["norm"] != "layer":
        raise ValueError(
            f"train.yaml: model_conf.norm {adapter['norm']!r} is not supported; accepted: 'layer' "
            "(LayerNorm eps 1e-3, as VITA's vLLM port)"
        )
    if adapter["activation_func"] != "gelu":
        raise ValueError(
            f"train.yaml: model_conf.activation_func {adapter['activation_func']!r} is not supported; "
            "accepted: 'gelu'"
        )
    enc_out = _int(adapter["enc_out_dim"], "model_conf.enc_out_dim")
    if enc_out != hidden:
        raise ValueError(f"train.yaml: model_conf.enc_out_dim {enc_out} != the encoder's width {hidden}")
    llm_dim = _int(adapter["llm_embed_dim"], "model_conf.llm_embed_dim")
    if llm_hidden_size is not None and llm_dim != llm_hidden_size:
        raise ValueError(
            f"train.yaml: model_conf.llm_embed_dim {llm_dim} != the LLM hidden size {llm_hidden_size}"
        )
    notes.append(f"adapter projects to llm_embed_dim {llm_dim} (the text model's hidden_size)")

    fbank = _mapping(
        _mapping(root.get("dataset_conf") or {}, "dataset_conf").get("fbank_conf") or {}, "fbank_conf"
    )
    if "num_mel_bins" in fbank and fbank["num_mel_bins"] != input_dim:
        raise ValueError(
            f"train.yaml: fbank_conf.num_mel_bins {fbank['num_mel_bins']} != the encoder input {input_dim}"
        )
    if root.get("is_json_cmvn") is False:
        notes.append("is_json_cmvn is false: global_cmvn is a Kaldi text file, not WeNet JSON")
    if fbank.get("dither"):
        notes.append(f"training fbank dither {fbank['dither']}: inference uses 0")

    config = {
        "input_dim": input_dim,
        "hidden_size": hidden,
        "num_hidden_layers": _int(tf["transformer_num_blocks"], "transformer-num-blocks"),
        "num_attention_heads": heads,
        "intermediate_size": _int(tf["transformer_linear_units"], "transformer-linear-units"),
        # CNNSubsampling's single-conv branch (VITA-1.5 forces it): Conv1d(enc, 2*enc, k, stride 2).
        "adapter_hidden_size": 2 * enc_out,
        "adapter_kernel_size": _int(adapter["kernel_size"], "model_conf.kernel_size"),
        "chunk_size": chunk_size,
        "left_chunks": left_chunks,
    }
    return config, notes


def global_cmvn_from_wenet_json(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """WeNet JSON CMVN statistics (`mean_stat`, `var_stat`, `frame_num`) -> (means, istds), float32.

    As upstream's `load_cmvn_json`: mean = sum / n, var = sum_sq / n - mean², floored at 1e-20,
    istd = 1 / sqrt(var), computed in double precision and stored as float32 (`GlobalCMVN` buffers).
    """
    data = json.loads(Path(path).read_text())
    try:
        sums, squares, count = data["mean_stat"], data["var_stat"], data["frame_num"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: CMVN JSON must have 'mean_stat', 'var_stat' and 'frame_num'") from None
    if len(sums) != len(squares) or not sums:
        raise ValueError(
            f"{path}: mean_stat ({len(sums)}) and var_stat ({len(squares)}) must be non-empty and equal"
        )
    if not count or count <= 0:
        raise ValueError(f"{path}: frame_num must be positive; got {count!r}")
    means, istds = [], []
    for total, square in zip(sums, squares, strict=True):
        mean = float(total) / count
        var = max(float(square) / count - mean * mean, 1.0e-20)
        means.append(mean)
        istds.append(1.0 / math.sqrt(var))
    return np.asarray(means, dtype=np.float32), np.asarray(istds, dtype=np.float32)
