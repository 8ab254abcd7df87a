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
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file

from .config import STATE_TOKEN_TEXT, VITA_ARCHITECTURE, Layout, VitaConfig
from .layout import checkpoint_shapes
from .prompts import SYSTEM_PROMPTS

TINY_VOCAB = 512  # embedding rows; the tokenizer uses fewer, placeholders take the last two
ForcedToken = Literal["query", "noise", "text"]

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
    clearly between inputs (a test that the multimodal splice matters needs that)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_shapes(config).items():
        out[name] = _init(name, shape, gen)
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
) -> Path:
    """Write a complete tiny checkpoint to `out_dir` and return it.

    `never_stop` bans EOS, so every answer runs to max_tokens (long, predictable answers for tests)."""
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
    return out
