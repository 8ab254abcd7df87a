"""Write a tiny `vita_tts_ckpt/` in the published layout: decoder/{model.json,final.pt}, codec/{model.json,final.pt}.

Every dimension is shrunk (decoder width 64, two heads of 32 as vLLM's CPU attention needs, two AR layers and one
NAR layer, 64 codec codes; codec generator 256 -> 16 channels at 600 samples per token, one resblock per stage), weights are random with
fan-in scaling, convolutions are stored weight-normed (`weight_g`/`weight_v`) as upstream's training saves them,
and the codec file carries an `encoder` part that decoding never reads, as the published one does.

The decoder's out_fnn bias bans bos, sos and pad (and eos unless `allow_eos`), so a tiny decoder speaks until
max_tokens: tests and benchmarks then control the length exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import CODEC_DIR, CONFIG_FILE, DECODER_DIR, WEIGHTS_FILE, CodecConfig, DecoderConfig
from .reference import codec_shapes, decoder_shapes
from .weights import split_weight_norm

BANNED_LOGIT = -40.0


def tiny_decoder_config(
    hidden: int = 64, layers: int = 2, heads: int = 2, ffn: int = 128, odim: int = 64
) -> DecoderConfig:
    return DecoderConfig(
        idim=hidden,
        odim=odim,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        output_dim=hidden,
    )


def tiny_codec_config(n_codes: int = 64) -> CodecConfig:
    return CodecConfig(
        upsample_rates=(5, 4, 3, 10),
        upsample_kernel_sizes=(11, 8, 7, 20),
        upsample_initial_channel=256,
        resblock="1",
        resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1, 3, 5),),
        n_codes=n_codes,
        n_code_groups=1,
        residul_layer=1,
        global_code_num=2,
        global_tokens=(3, 17),
        sampling_rate=24000,
        raw={
            "segment_size": 24000,
            "num_mels": 80,
            "hop_size": 600,
            "codebook_loss_lambda": 1.0,
            "commitment_loss_lambda": 0.25,
            "global_feature_conv": [128, 64, 128, 3, 1],
        },
    )


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        if name.endswith("norm.weight") or "layernorm" in name:
            return 1.0 + 0.1 * torch.randn(shape, generator=gen)
        return 0.05 * torch.randn(shape, generator=gen)
    if name.endswith("embedding.weight"):
        return torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def random_decoder_weights(
    cfg: DecoderConfig, seed: int = 0, allow_eos: bool = False
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {name: _random(name, shape, gen) for name, shape in decoder_shapes(cfg).items()}
    out["out_fnn.weight"] *= 3.0  # logits of a few units: sampling has real choices to make
    banned = [cfg.bos_id, cfg.sos_id, cfg.pad_id] + ([] if allow_eos else [cfg.eos_id])
    out["out_fnn.bias"][banned] = BANNED_LOGIT
    return out


def random_codec_weights(cfg: CodecConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Folded weights (what decoding uses), keyed like `weights.map_codec_names` output."""
    gen = torch.Generator().manual_seed(seed + 1)
    out: dict[str, torch.Tensor] = {}
    for name, shape in codec_shapes(cfg).items():
        if "quantizer" in name:
            out[name] = 0.5 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            out[name] = 0.01 * torch.randn(shape, generator=gen)
        else:
            # transposed convs are (in, out, k): their fan-in is in * k / stride; fan_in scaling of dims 1.. is close
            out[name] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return out


def _published_codec_dict(folded: dict[str, torch.Tensor], seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Nest as {"generator", "quantizer", "encoder"} with weight-normed convolutions stored as (g, v)."""
    gen_part: dict[str, torch.Tensor] = {}
    quant_part: dict[str, torch.Tensor] = {}
    for name, tensor in folded.items():
        part, rest = name.split(".", 1)
        if part == "quantizer":
            quant_part[rest] = tensor
        elif rest.endswith(".weight"):
            g, v = split_weight_norm(tensor)
            gen_part[rest[: -len(".weight")] + ".weight_g"] = g
            gen_part[rest[: -len(".weight")] + ".weight_v"] = v
        else:
            gen_part[rest] = tensor
    gen = torch.Generator().manual_seed(seed + 2)
    encoder = {
        "conv_pre.bias": torch.randn(32, generator=gen),
        "conv_post.bias": torch.randn(512, generator=gen),
    }
    return {"generator": gen_part, "quantizer": quant_part, "encoder": encoder}


def build_tiny_tts(
    out_dir: str | Path,
    *,
    seed: int = 0,
    allow_eos: bool = False,
    decoder: DecoderConfig | None = None,
    codec: CodecConfig | None = None,
) -> Path:
    """Write a tiny vita_tts_ckpt to `out_dir` (e.g. `<model>/vita_tts_ckpt`) and return it."""
    out = Path(out_dir)
    dcfg = decoder or tiny_decoder_config()
    ccfg = codec or tiny_codec_config(n_codes=dcfg.odim)
    (out / DECODER_DIR).mkdir(parents=True, exist_ok=True)
    (out / CODEC_DIR).mkdir(parents=True, exist_ok=True)
    (out / DECODER_DIR / CONFIG_FILE).write_text(json.dumps(dcfg.to_json(), indent=1))
    torch.save(random_decoder_weights(dcfg, seed, allow_eos), out / DECODER_DIR / WEIGHTS_FILE)
    (out / CODEC_DIR / CONFIG_FILE).write_text(json.dumps(ccfg.to_json(), indent=1))
    torch.save(_published_codec_dict(random_codec_weights(ccfg, seed), seed), out / CODEC_DIR / WEIGHTS_FILE)
    return out
