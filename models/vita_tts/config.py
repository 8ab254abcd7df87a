"""The two JSON files of a `vita_tts_ckpt/`: the speech decoder's `[idim, odim, args]` and TiCodec's hyper-parameters.

Upstream builds its decoder layers from `transformers.LlamaConfig(...)` with only some fields given; every other
field is LlamaConfig's default of the transformers release VITA-1.5 pinned (4.47.1): RMSNorm eps 1e-6, RoPE
theta 10000, SiLU, as many KV heads as heads, no biases, head_dim = hidden / heads. They are spelled out here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TTS_DIR = "vita_tts_ckpt"  # its folder in (or beside) a VITA-1.5 checkpoint
DECODER_DIR = "decoder"
CODEC_DIR = "codec"
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "final.pt"
VITA_TTS_ARCHITECTURE = "VitaTTSDecoderForCausalLM"  # the AR decoder's vLLM architecture (models.plugin)
SAMPLES_PER_TOKEN = 600  # 24 kHz / 40 codec tokens per second (product of the codec's upsample rates)


class TTSConfigError(ValueError):
    """A vita_tts_ckpt config file is missing, malformed or outside what we implement."""


@dataclass(frozen=True)
class DecoderConfig:
    """LLM2TTSCodecAR: NAR `pre_nn` (half depth, bidirectional) + AR Llama decoder over codec tokens."""

    idim: int  # width of the input vectors (the LLM embedding row is cut into hidden/idim of them)
    odim: int  # codec vocabulary; the decoder's is odim + 4 (bos, sos, eos, pad)
    hidden_size: int  # transformer_attention_dim (== idim: bos is embedded at idim and concatenated)
    intermediate_size: int  # transformer_linear_units
    num_layers: int  # transformer_num_blocks (pre_nn has num_layers // 2)
    num_heads: int  # transformer_attention_heads
    output_dim: int  # encoder_output_dim (== hidden_size)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    kv_cache_prefix_finetune: int = (
        0  # prefix layers exist in the weights; upstream's demo never feeds a prefix
    )
    raw_args: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.odim + 4

    @property
    def bos_id(self) -> int:
        return self.odim

    @property
    def sos_id(self) -> int:
        return self.odim + 1

    @property
    def eos_id(self) -> int:
        return self.odim + 2

    @property
    def pad_id(self) -> int:
        return self.odim + 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_pre_nn_layers(self) -> int:
        return self.num_layers // 2

    @classmethod
    def from_json(cls, raw: Any, source: str = "decoder/model.json") -> DecoderConfig:
        if not (isinstance(raw, list) and len(raw) == 3 and isinstance(raw[2], dict)):
            raise TTSConfigError(
                f"{source}: expected [idim, odim, {{args}}] as upstream writes it; got {type(raw).__name__}"
            )
        args = dict(raw[2])
        try:
            cfg = cls(
                idim=int(args["idim"]),
                odim=int(args["odim"]),
                hidden_size=int(args["transformer_attention_dim"]),
                intermediate_size=int(args["transformer_linear_units"]),
                num_layers=int(args["transformer_num_blocks"]),
                num_heads=int(args["transformer_attention_heads"]),
                output_dim=int(args.get("encoder_output_dim", args["transformer_attention_dim"])),
                kv_cache_prefix_finetune=int(args.get("kv_cache_prefix_finetune", 0)),
                raw_args=args,
            )
        except KeyError as exc:
            raise TTSConfigError(f"{source}: args lack {exc.args[0]!r}") from exc
        if cfg.idim != cfg.hidden_size or cfg.output_dim != cfg.hidden_size:
            raise TTSConfigError(
                f"{source}: idim ({cfg.idim}), transformer_attention_dim ({cfg.hidden_size}) and encoder_output_dim "
                f"({cfg.output_dim}) must be equal (upstream concatenates the bos embedding with the inputs)"
            )
        if cfg.hidden_size % cfg.num_heads:
            raise TTSConfigError(f"{source}: {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
        return cfg

    def to_json(self) -> list[Any]:
        args = {
            **self.raw_args,
            "idim": self.idim,
            "odim": self.odim,
            "transformer_attention_dim": self.hidden_size,
            "transformer_linear_units": self.intermediate_size,
            "transformer_num_blocks": self.num_layers,
            "transformer_attention_heads": self.num_heads,
            "encoder_output_dim": self.output_dim,
            "kv_cache_prefix_finetune": self.kv_cache_prefix_finetune,
        }
        for key, value in _DECODER_ARG_DEFAULTS.items():
            args.setdefault(key, value)
        return [self.idim, self.odim, args]


# The other args upstream's argparse namespace carries (training only); written so a tiny model.json looks real.
_DECODER_ARG_DEFAULTS: dict[str, Any] = {
    "encoder_pre_norm_type": "ln",
    "encoder_drop_rate": 0.1,
    "encoder_criterion": "ce",
    "encoder_upsample_rate": 1,
    "transformer_dropout_rate": 0.1,
}


@dataclass(frozen=True)
class CodecConfig:
    """TiCodec (HiFi-GAN generator + grouped/residual VQ, global style tokens); decoding needs only these."""

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock: str  # "1" or "2"
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    n_codes: int
    n_code_groups: int
    residul_layer: int  # (sic) upstream's spelling
    global_code_num: int
    global_tokens: tuple[int, ...]
    sampling_rate: int = 24000
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def samples_per_token(self) -> int:
        n = 1
        for r in self.upsample_rates:
            n *= r
        return n

    @classmethod
    def from_json(cls, raw: Any, source: str = "codec/model.json") -> CodecConfig:
        if not isinstance(raw, dict):
            raise TTSConfigError(f"{source}: expected a JSON object; got {type(raw).__name__}")
        try:
            cfg = cls(
                upsample_rates=tuple(int(v) for v in raw["upsample_rates"]),
                upsample_kernel_sizes=tuple(int(v) for v in raw["upsample_kernel_sizes"]),
                upsample_initial_channel=int(raw["upsample_initial_channel"]),
                resblock=str(raw["resblock"]),
                resblock_kernel_sizes=tuple(int(v) for v in raw["resblock_kernel_sizes"]),
                resblock_dilation_sizes=tuple(
                    tuple(int(d) for d in ds) for ds in raw["resblock_dilation_sizes"]
                ),
                n_codes=int(raw["n_codes"]),
                n_code_groups=int(raw["n_code_groups"]),
                residul_layer=int(raw["residul_layer"]),
                global_code_num=int(raw["global_code_num"]),
                global_tokens=tuple(int(v) for v in raw["global_tokens"]),
                sampling_rate=int(raw.get("sampling_rate", 24000)),
                raw=dict(raw),
            )
        except KeyError as exc:
            raise TTSConfigError(f"{source}: lacks {exc.args[0]!r}") from exc
        if cfg.resblock not in ("1", "2"):
            raise TTSConfigError(f"{source}: resblock must be '1' or '2'; got {cfg.resblock!r}")
        if cfg.residul_layer not in (1, 2, 4) or 512 % cfg.n_code_groups or 128 % cfg.global_code_num:
            raise TTSConfigError(
                f"{source}: residul_layer must be 1, 2 or 4, n_code_groups divide 512 and "
                f"global_code_num divide 128"
            )
        if len(cfg.global_tokens) != cfg.global_code_num:
            raise TTSConfigError(
                f"{source}: {len(cfg.global_tokens)} global_tokens for global_code_num {cfg.global_code_num}"
            )
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise TTSConfigError(f"{source}: upsample_rates and upsample_kernel_sizes differ in length")
        return cfg

    def to_json(self) -> dict[str, Any]:
        return {
            **self.raw,
            "resblock": self.resblock,
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "upsample_initial_channel": self.upsample_initial_channel,
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "n_codes": self.n_codes,
            "n_code_groups": self.n_code_groups,
            "residul_layer": self.residul_layer,
            "global_code_num": self.global_code_num,
            "global_tokens": list(self.global_tokens),
            "sampling_rate": self.sampling_rate,
        }


@dataclass(frozen=True)
class TTSCheckpoint:
    root: Path
    decoder: DecoderConfig
    codec: CodecConfig

    @property
    def decoder_weights(self) -> Path:
        return self.root / DECODER_DIR / WEIGHTS_FILE

    @property
    def codec_weights(self) -> Path:
        return self.root / CODEC_DIR / WEIGHTS_FILE


def find_tts_dir(model_dir: str | Path) -> Path | None:
    """The speech decoder of a VITA-1.5 model directory: its `vita_tts_ckpt/`, the directory itself, or the
    `vita_tts_ckpt/` beside it (the published repo keeps `VITA1.5_ckpt/` and `vita_tts_ckpt/` side by side at
    its root); None if absent."""
    root = Path(model_dir)
    for candidate in (root / TTS_DIR, root, root.parent / TTS_DIR):
        if all(
            (candidate / sub / name).is_file()
            for sub in (DECODER_DIR, CODEC_DIR)
            for name in (CONFIG_FILE, WEIGHTS_FILE)
        ):
            return candidate
    return None


def open_tts_checkpoint(path: str | Path) -> TTSCheckpoint:
    root = find_tts_dir(path)
    if root is None:
        raise TTSConfigError(
            f"{path}: no vita_tts_ckpt (expected decoder/model.json, decoder/final.pt, codec/model.json, "
            f"codec/final.pt in it or in its vita_tts_ckpt/)"
        )
    decoder = DecoderConfig.from_json(json.loads((root / DECODER_DIR / CONFIG_FILE).read_text()))
    codec = CodecConfig.from_json(json.loads((root / CODEC_DIR / CONFIG_FILE).read_text()))
    if codec.n_code_groups * codec.residul_layer != 1:
        raise TTSConfigError(
            f"{root}: the speech decoder emits one codebook; the codec has "
            f"{codec.n_code_groups * codec.residul_layer}"
        )
    if decoder.odim > codec.n_codes:
        raise TTSConfigError(f"{root}: decoder odim {decoder.odim} exceeds the codec's {codec.n_codes} codes")
    return TTSCheckpoint(root, decoder, codec)
