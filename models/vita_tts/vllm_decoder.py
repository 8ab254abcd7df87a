"""The speech decoder's AR stage as a vLLM model, so every speaking session shares one engine's batching.

Upstream's AR decoder is a *prefix LM*: the prompt `[bos, pre_nn(x)]` attends to itself both ways, then `sos`
and each codec token attend to the whole prompt and causally to the tokens before them. vLLM's attention is
causal (its bidirectional "mm prefix" mode exists only in GPU kernels and only for image spans), so the prompt
cannot simply be prompt embeddings run causally: that would be a different model. Instead the prompt arrives as
**prompt embeddings that carry every layer's input** at each prompt position, computed in torch by one
bidirectional pass (`reference.ReferenceDecoder.prompt_layer_inputs`, batched with the NAR stage). A prompt
position's keys and values in layer i depend only on layer i's input there, so overriding each layer's input at
the prompt positions reproduces upstream's KV cache exactly; everything after (sos, the generated tokens, their
attention, sampling, the KV cache, continuous batching, preemption, abort) is ordinary vLLM.

Carrier layout: a row of width (num_layers + 1) * hidden (`projection_size` in the config, which vLLM reads as
the inputs-embeds width): block i = layer i's input, the last block's first element = 1.0 on prompt positions.
Token rows (sos, generated tokens) are the embedding in block 0 and zeros elsewhere, so they run normally.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
from vllm.sequence import IntermediateTensors

from .config import VITA_TTS_ARCHITECTURE, DecoderConfig

__all__ = ["VITA_TTS_ARCHITECTURE", "VitaTTSDecoderForCausalLM", "carrier_width", "prompt_carrier"]


def carrier_width(cfg: DecoderConfig) -> int:
    return (cfg.num_layers + 1) * cfg.hidden_size


def prompt_carrier(layer_inputs: torch.Tensor, sos_embedding: torch.Tensor) -> torch.Tensor:
    """(n, L, D) per-layer prompt inputs + the (D,) sos embedding -> (n + 1, (L + 1) * D) prompt embeddings."""
    n, layers, d = layer_inputs.shape
    rows = torch.zeros(n + 1, (layers + 1) * d, dtype=layer_inputs.dtype)
    rows[:n, : layers * d] = layer_inputs.reshape(n, layers * d)
    rows[:n, layers * d] = 1.0
    rows[n, :d] = sos_embedding
    return rows


def vllm_config_dict(cfg: DecoderConfig, dtype: str = "float32") -> dict:
    """config.json of the engine directory: a Llama config (model_type llama) naming our architecture."""
    from transformers import LlamaConfig

    llama = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id,
        tie_word_embeddings=False,
    )
    out = llama.to_dict()
    out.update(
        {
            "architectures": [VITA_TTS_ARCHITECTURE],
            "projection_size": carrier_width(
                cfg
            ),  # vLLM's inputs-embeds width (ModelConfig.get_inputs_embeds_size)
            "torch_dtype": dtype,
            "dtype": dtype,
        }
    )
    return out


def write_engine_dir(
    cfg: DecoderConfig, weights: dict[str, torch.Tensor], out_dir: Path, dtype: str = "float32"
) -> Path:
    """A directory vLLM can load: config.json + model.safetensors (the mapped decoder tensors)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(vllm_config_dict(cfg, dtype), indent=1))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"))
    return out_dir


class VitaTTSDecoderForCausalLM(nn.Module):
    # Upstream state-dict names -> ours: the NAR layers run in torch (dropped here), q/k/v and gate/up stack.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        },
        orig_to_new_prefix={"layers_pre_nn.": None, "layers_prefix.": None},
    )
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.hidden = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.embedding = VocabParallelEmbedding(config.vocab_size, self.hidden)
        self.layers = nn.ModuleList(
            [
                LlamaDecoderLayer(
                    vllm_config, prefix=f"{prefix}layers.{i}" if prefix else f"layers.{i}", config=config
                )
                for i in range(self.num_layers)
            ]
        )
        self.norm = RMSNorm(self.hidden, eps=config.rms_norm_eps)
        self.out_fnn = nn.Linear(self.hidden, config.vocab_size, bias=True)

    def embed_input_ids(self, input_ids: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """Token rows of the carrier: the embedding in block 0, zeros (no override flag) elsewhere."""
        emb = self.embedding(input_ids)
        pad = emb.new_zeros(emb.shape[0], self.hidden * self.num_layers)
        return torch.cat([emb, pad], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        carrier = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)  # type: ignore[arg-type]
        d = self.hidden
        is_prompt = (carrier[:, self.num_layers * d] > 0.5).unsqueeze(-1)
        hidden = carrier[:, :d]
        for i, layer in enumerate(self.layers):
            if i:
                hidden = torch.where(is_prompt, carrier[:, i * d : (i + 1) * d], hidden)
            out, residual = layer(positions, hidden, None)
            hidden = out + residual
        return self.norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_fnn(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
