"""Safe loading of the `final.pt` pickles and the declarative name tables of both files.

`final.pt` files are pickles. They are read with `torch.load(weights_only=True)` only: tensors, dicts, lists and
plain numbers load; any other object (a class, a function, an `argparse.Namespace`) makes torch refuse, and we
refuse the file with a message that says so. Nothing ever unpickles arbitrary objects.

Names are mapped by tables, not code: `DECODER_*` for the speech decoder, `CODEC_*` for TiCodec. Weight-normed
convolutions are stored as (g, v) pairs, under the old `weight_g`/`weight_v` names or the newer parametrization
names; both fold to `weight = g * v / ||v||` (norm over every dim but 0), as `remove_weight_norm` does upstream.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


class TTSWeightsError(ValueError):
    """A final.pt that is not a plain tensor file, or that lacks tensors the config needs."""


# --- the speech decoder (decoder/final.pt) --------------------------------------------------------

# Wrappers upstream's loader unwraps ("model" when present).
DECODER_WRAPPERS: tuple[str, ...] = ("model.",)
# Tensors the inference path never reads: the prefix branch (the demo passes no prefix), RoPE caches.
DECODER_DROPPED: tuple[str, ...] = ("layers_prefix.", "rotary_emb", "criterion.")
# Published prefix -> module prefix in `reference.ReferenceDecoder` (identity: our modules keep upstream's names).
DECODER_PREFIXES: dict[str, str] = {
    "embedding.": "embedding.",
    "layers_pre_nn.": "layers_pre_nn.",
    "layers.": "layers.",
    "norm.": "norm.",
    "out_fnn.": "out_fnn.",
}

# --- TiCodec (codec/final.pt) ---------------------------------------------------------------------

CODEC_KEPT: tuple[str, ...] = ("generator.", "quantizer.")
CODEC_DROPPED: tuple[str, ...] = ("encoder.", "mpd.", "msd.", "optim", "steps", "epoch")
WEIGHT_NORM_SUFFIXES: dict[str, str] = {  # suffix -> which half of the (g, v) pair
    ".weight_g": "g",
    ".weight_v": "v",
    ".parametrizations.weight.original0": "g",
    ".parametrizations.weight.original1": "v",
}


def safe_load(path: str | Path) -> dict[str, torch.Tensor]:
    """A `final.pt` as a flat {dotted name: tensor} dict. Refuses files that need more than tensors."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TTSWeightsError(
            f"{path}: refusing to load: it needs more than tensors to unpickle (only "
            f"torch.load(weights_only=True) files are accepted: tensors, dicts, lists, numbers). torch said: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise TTSWeightsError(f"{path}: not a readable torch file: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise TTSWeightsError(f"{path}: expected a dict of tensors; got {type(obj).__name__}")
    flat = dict(_flatten(obj))
    if not flat:
        raise TTSWeightsError(f"{path}: holds no tensors")
    return flat


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        # numbers, strings, lists (training step counters, optimizer settings): not weights


def map_decoder_names(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published decoder names -> reference module names (wrappers stripped, unused tensors dropped)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        for wrapper in DECODER_WRAPPERS:
            if name.startswith(wrapper) and name[len(wrapper) :].startswith(tuple(DECODER_PREFIXES)):
                name = name[len(wrapper) :]
        if name.startswith(DECODER_DROPPED) or ".rotary_emb" in name:
            continue
        for old, new in DECODER_PREFIXES.items():
            if name.startswith(old):
                out[new + name[len(old) :]] = tensor
                break
        else:
            raise TTSWeightsError(
                f"decoder/final.pt: unexpected tensor {name!r} (accepted prefixes: "
                f"{', '.join(DECODER_PREFIXES)}; dropped: {', '.join(DECODER_DROPPED)})"
            )
    return out


def map_codec_names(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published codec names -> plain module names, weight norm folded, encoder/discriminators dropped."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.startswith(CODEC_DROPPED):
            continue
        if not name.startswith(CODEC_KEPT):
            raise TTSWeightsError(
                f"codec/final.pt: unexpected tensor {name!r} (accepted: "
                f"{', '.join(CODEC_KEPT)}; dropped: {', '.join(CODEC_DROPPED)})"
            )
        for suffix, half in WEIGHT_NORM_SUFFIXES.items():
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)] + ".weight", {})[half] = tensor
                break
        else:
            out[name] = tensor
    for name, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            raise TTSWeightsError(
                f"codec/final.pt: weight-normed {name!r} lacks its {'g' if 'g' not in pair else 'v'} tensor"
            )
        out[name] = fold_weight_norm(pair["g"], pair["v"])
    return out


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`g * v / ||v||`, the norm taken per slice along dim 0 (torch's weight_norm default, dim=0)."""
    v32 = v.to(torch.float32)
    norm = v32.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return (g.to(torch.float32) * v32 / norm).to(v.dtype)


def split_weight_norm(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, v) with `fold_weight_norm(g, v) == weight` (tiny checkpoints store convolutions weight-normed)."""
    g = weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))
    return g.clone(), weight.clone()


def require(weights: Mapping[str, torch.Tensor], names: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Every name present with its shape, or one error listing what is wrong."""
    problems = []
    for name, shape in names.items():
        if name not in weights:
            problems.append(f"{name} missing")
        elif tuple(weights[name].shape) != tuple(shape):
            problems.append(f"{name} has shape {tuple(weights[name].shape)}, the config needs {tuple(shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise TTSWeightsError(f"{source}: {'; '.join(problems[:5])}{more}")
