"""The published VITA checkpoint layout: tensor names and shapes, and how they map onto our modules.

`checkpoint_shapes(config)` yields every tensor the published checkpoints hold (training names,
`model.*` + `lm_head.weight`) for any config size, so a tiny checkpoint is the real layout shrunk,
and a test can check the full-size output against the published name/shape list.
`CHECKPOINT_PREFIXES` is the one prefix table both the vLLM model (through `WeightsMapper`) and the
pure-torch reference use to place those names.
"""

from __future__ import annotations

from collections.abc import Iterator

from .config import VitaConfig

Shape = tuple[int, ...]

# Published prefix -> our module prefix. Order matters: the most specific prefixes come first and
# the first match wins, so `model.` (the LLM) is last.
CHECKPOINT_PREFIXES: dict[str, str] = {
    "model.vision_tower.vision_tower.": "vision_tower.",
    "model.mm_projector.0.": "vision_projector.linear_1.",
    "model.mm_projector.2.": "vision_projector.linear_2.",
    "model.audio_encoder.encoder.enc.0.core.conv.": "audio_tower.subsampling.conv_in.",
    "model.audio_encoder.encoder.enc.0.core.out.0.": "audio_tower.subsampling.out.",
    "model.audio_encoder.encoder.enc.1.embed.": "audio_tower.embeddings.embedding.",
    "model.audio_encoder.encoder.enc.1.encoders.": "audio_tower.encoder.layers.",
    "model.audio_encoder.encoder.enc.1.after_norm.": "audio_tower.encoder.layer_norm.",
    "model.audio_encoder.adpter.conv1d2.": "audio_projector.conv1d.",
    "model.audio_encoder.adpter.bn2.": "audio_projector.norm.",
    "model.audio_encoder.adpter.project.": "audio_projector.linear.",
    "model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
}

# CMVN is applied by the feature extractor (feature_extractor/preprocessor_config.json).
DROPPED_PREFIXES: tuple[str, ...] = ("model.audio_encoder.encoder.global_cmvn.",)


def map_checkpoint_name(name: str) -> str | None:
    """Our module name for a published tensor name, or None for tensors we drop."""
    if name.startswith(DROPPED_PREFIXES):
        return None
    for old, new in CHECKPOINT_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def checkpoint_shapes(config: VitaConfig) -> dict[str, Shape]:
    """Every tensor of a VITA checkpoint with this config, in the published naming."""
    shapes: dict[str, Shape] = {}
    shapes.update(_text_model_shapes(config))
    shapes.update(_vision_shapes(config))
    shapes.update(_audio_shapes(config))
    return shapes


def _text_model_shapes(config: VitaConfig) -> Iterator[tuple[str, Shape]]:
    text = config.get_text_config()
    hidden, vocab = text.hidden_size, text.vocab_size
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    model_type = text.model_type
    if model_type not in ("qwen2", "mixtral"):
        yield from _generic_text_shapes(config)
        return
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(text.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (heads * head_dim, hidden)
        yield p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim)
        if model_type == "qwen2":  # Qwen2 has q/k/v biases and a dense SwiGLU MLP
            yield p + "self_attn.q_proj.bias", (heads * head_dim,)
            yield p + "self_attn.k_proj.bias", (kv_heads * head_dim,)
            yield p + "self_attn.v_proj.bias", (kv_heads * head_dim,)
            yield p + "mlp.gate_proj.weight", (text.intermediate_size, hidden)
            yield p + "mlp.up_proj.weight", (text.intermediate_size, hidden)
            yield p + "mlp.down_proj.weight", (hidden, text.intermediate_size)
        else:  # Mixtral: per-expert w1/w2/w3 as the transformers 4.x checkpoints store them
            yield p + "block_sparse_moe.gate.weight", (text.num_local_experts, hidden)
            for e in range(text.num_local_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                yield q + "w1.weight", (text.intermediate_size, hidden)
                yield q + "w2.weight", (hidden, text.intermediate_size)
                yield q + "w3.weight", (text.intermediate_size, hidden)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    if not text.tie_word_embeddings:
        yield "lm_head.weight", (vocab, hidden)


def _generic_text_shapes(config: VitaConfig) -> Iterator[tuple[str, Shape]]:
    """Any other dense text model: its own HF state-dict names (they equal its checkpoint names)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config.get_text_config())
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.get_text_config().tie_word_embeddings:
            continue
        yield name, tuple(tensor.shape)


def _vision_shapes(config: VitaConfig) -> Iterator[tuple[str, Shape]]:
    v = config.vision_config
    h, inner = v.hidden_size, v.intermediate_size
    grid = v.image_size // v.patch_size
    p = "model.vision_tower.vision_tower."
    yield p + "embeddings.class_embedding", (1, 1, h)
    yield p + "embeddings.position_embedding", (1, grid * grid + 1, h)
    yield p + "embeddings.patch_embedding.weight", (h, 3, v.patch_size, v.patch_size)
    yield p + "embeddings.patch_embedding.bias", (h,)
    for i in range(v.num_hidden_layers):
        q = f"{p}encoder.layers.{i}."
        yield q + "ls1", (h,)
        yield q + "ls2", (h,)
        yield q + "attn.qkv.weight", (3 * h, h)
        yield q + "attn.qkv.bias", (3 * h,)
        yield q + "attn.proj.weight", (h, h)
        yield q + "attn.proj.bias", (h,)
        yield q + "mlp.fc1.weight", (inner, h)
        yield q + "mlp.fc1.bias", (inner,)
        yield q + "mlp.fc2.weight", (h, inner)
        yield q + "mlp.fc2.bias", (h,)
        for norm in ("norm1", "norm2"):
            yield q + norm + ".weight", (h,)
            yield q + norm + ".bias", (h,)
    llm = config.get_text_config().hidden_size
    yield "model.mm_projector.0.weight", (llm, config.vision_projector_in)
    yield "model.mm_projector.0.bias", (llm,)
    yield "model.mm_projector.2.weight", (llm, llm)
    yield "model.mm_projector.2.bias", (llm,)


def _audio_shapes(config: VitaConfig) -> Iterator[tuple[str, Shape]]:
    a = config.audio_config
    h, inner, heads = a.hidden_size, a.intermediate_size, a.num_attention_heads
    sub_freq = ((a.input_dim - 1) // 2 - 1) // 2  # two stride-2 3x3 convs over the mel axis
    p = "model.audio_encoder.encoder."
    yield p + "global_cmvn.mean", (a.input_dim,)
    yield p + "global_cmvn.istd", (a.input_dim,)
    yield p + "enc.0.core.conv.0.weight", (h, 1, 3, 3)
    yield p + "enc.0.core.conv.0.bias", (h,)
    yield p + "enc.0.core.conv.2.weight", (h, h, 3, 3)
    yield p + "enc.0.core.conv.2.bias", (h,)
    yield p + "enc.0.core.out.0.weight", (h, h * sub_freq)
    yield p + "enc.0.core.out.0.bias", (h,)
    yield p + "enc.1.embed.0.weight", (h, h)
    yield p + "enc.1.embed.0.bias", (h,)
    yield p + "enc.1.embed.1.weight", (h,)
    yield p + "enc.1.embed.1.bias", (h,)
    for i in range(a.num_hidden_layers):
        q = f"{p}enc.1.encoders.{i}."
        yield q + "self_attn.pos_bias_u", (heads, h // heads)
        yield q + "self_attn.pos_bias_v", (heads, h // heads)
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            yield q + f"self_attn.{lin}.weight", (h, h)
            yield q + f"self_attn.{lin}.bias", (h,)
        yield q + "self_attn.linear_pos.weight", (h, h)
        yield q + "feed_forward.w_1.weight", (inner, h)
        yield q + "feed_forward.w_1.bias", (inner,)
        yield q + "feed_forward.w_2.weight", (h, inner)
        yield q + "feed_forward.w_2.bias", (h,)
        for norm in ("norm1", "norm2"):
            yield q + norm + ".weight", (h,)
            yield q + norm + ".bias", (h,)
    yield p + "enc.1.after_norm.weight", (h,)
    yield p + "enc.1.after_norm.bias", (h,)
    llm = config.get_text_config().hidden_size
    q = "model.audio_encoder.adpter."
    yield q + "conv1d2.weight", (a.adapter_hidden_size, h, a.adapter_kernel_size)
    yield q + "conv1d2.bias", (a.adapter_hidden_size,)
    yield q + "bn2.weight", (a.adapter_hidden_size,)
    yield q + "bn2.bias", (a.adapter_hidden_size,)
    yield q + "project.weight", (llm, a.adapter_hidden_size)
    yield q + "project.bias", (llm,)
