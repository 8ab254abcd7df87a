"""Pure-torch transcription of upstream's speech-decoder and TiCodec-decoder math (our own code, from the formulas).

Speech decoder (upstream `LLM2TTSCodecAR`, transformers 4.47 Llama layers with eager attention):
* NAR `pre_nn`: num_layers // 2 Llama layers over the input vectors, positions 0..T-1, **bidirectional** (an
  all-true mask).
* AR decoder: num_layers Llama layers over `[bos_emb, pre_nn(x)]` then `sos`, then each generated token. The
  prompt pass runs with *no* mask, which eager attention reads as full (bidirectional) attention over the prompt;
  training used the same prefix-LM mask. `sos` and every later token attend to the prompt and causally to the
  tokens before them. Positions run 0, 1, ... over the whole sequence (bos at 0, sos at n + 1).
* Head: final RMSNorm then `out_fnn` (a Linear with bias) to odim + 4 logits.
* Sampling (`sample_next`): optional penalty over the last `penalty_window` generated tokens (sos included),
  dividing the logit once per *occurrence* (upstream builds a `set` of 0-d tensors, which never deduplicates),
  then softmax, keep the top k, renormalize, draw one. The web demo runs with no penalty (window -1) and k = 2.

TiCodec decoder (upstream `VQVAE.forward` with weight norm removed): codebook lookup (B, T) -> (B, 512, T),
HiFi-GAN generator (conv_pre, per stage: leaky ReLU 0.1, transposed conv, mean of the resblocks, plus the global
style vector where the stage has 128 channels), leaky ReLU, conv_post, tanh -> (B, 1, T * 600).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

from .config import CodecConfig, DecoderConfig, TTSCheckpoint
from .weights import map_codec_names, map_decoder_names, require, safe_load

LRELU_SLOPE = 0.1
Shape = tuple[int, ...]


# --- shapes of the published tensors ----------------------------------------------------------------


def _llama_layer_shapes(prefix: str, cfg: DecoderConfig) -> Iterator[tuple[str, Shape]]:
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        yield f"{prefix}self_attn.{proj}.weight", (h, h)
    yield f"{prefix}mlp.gate_proj.weight", (ffn, h)
    yield f"{prefix}mlp.up_proj.weight", (ffn, h)
    yield f"{prefix}mlp.down_proj.weight", (h, ffn)
    yield f"{prefix}input_layernorm.weight", (h,)
    yield f"{prefix}post_attention_layernorm.weight", (h,)


def decoder_shapes(cfg: DecoderConfig) -> dict[str, Shape]:
    """Every tensor of decoder/final.pt that inference reads, in upstream's state-dict names."""
    shapes: dict[str, Shape] = {"embedding.weight": (cfg.vocab_size, cfg.idim)}
    for i in range(cfg.num_pre_nn_layers):
        shapes.update(_llama_layer_shapes(f"layers_pre_nn.{i}.", cfg))
    for i in range(cfg.num_layers):
        shapes.update(_llama_layer_shapes(f"layers.{i}.", cfg))
    shapes["norm.weight"] = (cfg.hidden_size,)
    shapes["out_fnn.weight"] = (cfg.vocab_size, cfg.output_dim)
    shapes["out_fnn.bias"] = (cfg.vocab_size,)
    return shapes


def _resblock_convs(cfg: CodecConfig, dilations: tuple[int, ...]) -> list[tuple[str, int]]:
    """(name, dilation) of one resblock's convolutions."""
    if cfg.resblock == "1":
        return [(f"convs1.{m}", d) for m, d in enumerate(dilations[:3])] + [
            (f"convs2.{m}", 1) for m in range(3)
        ]
    return [(f"convs.{m}", d) for m, d in enumerate(dilations[:2])]


def generator_channels(cfg: CodecConfig) -> list[int]:
    """Channels after each upsampling stage."""
    return [cfg.upsample_initial_channel // (2 ** (i + 1)) for i in range(len(cfg.upsample_rates))]


def codec_shapes(cfg: CodecConfig) -> dict[str, Shape]:
    """Folded (weight-norm removed) decoder-side tensors of codec/final.pt, after `map_codec_names`."""
    c0 = cfg.upsample_initial_channel
    shapes: dict[str, Shape] = {"generator.conv_pre.weight": (c0, 512, 7), "generator.conv_pre.bias": (c0,)}
    chans = generator_channels(cfg)
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
        cin = c0 // (2**i)
        shapes[f"generator.ups.{i}.weight"] = (cin, chans[i], k)
        shapes[f"generator.ups.{i}.bias"] = (chans[i],)
        for j, (rk, dil) in enumerate(
            zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        ):
            r = i * len(cfg.resblock_kernel_sizes) + j
            for conv, _d in _resblock_convs(cfg, dil):
                shapes[f"generator.resblocks.{r}.{conv}.weight"] = (chans[i], chans[i], rk)
                shapes[f"generator.resblocks.{r}.{conv}.bias"] = (chans[i],)
    shapes["generator.conv_post.weight"] = (1, chans[-1], 7)
    shapes["generator.conv_post.bias"] = (1,)
    for layer, name in enumerate(
        ("quantizer_modules", "quantizer_modules2", "quantizer_modules3", "quantizer_modules4")[
            : cfg.residul_layer
        ]
    ):
        del layer
        for j in range(cfg.n_code_groups):
            shapes[f"quantizer.{name}.{j}.embedding.weight"] = (cfg.n_codes, 512 // cfg.n_code_groups)
    for j in range(cfg.global_code_num):
        shapes[f"quantizer.quantizer_modules_globaltokens.{j}.embedding.weight"] = (
            cfg.n_codes,
            128 // cfg.global_code_num,
        )
    return shapes


# --- Llama building blocks (transformers 4.47 numerics) -------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (heads, T, head_dim); cos/sin: (T, head_dim), computed in float32 and cast to x's dtype (as
    transformers does, so bfloat16 runs stay bfloat16; a no-op in float32)."""
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


class LlamaStack:
    """A stack of Llama decoder layers over one sequence (no batch axis), with an optional KV cache."""

    def __init__(self, weights: Mapping[str, torch.Tensor], prefix: str, num_layers: int, cfg: DecoderConfig):
        self.w = weights
        self.prefix = prefix
        self.num_layers = num_layers
        self.cfg = cfg

    def layer(
        self,
        i: int,
        x: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor | None,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """One layer. `allowed[q, k]` says which keys each query sees (None: all); `cache[i]` holds earlier K/V."""
        cfg, p = self.cfg, f"{self.prefix}{i}."
        w = self.w
        nh, hd = cfg.num_heads, cfg.head_dim
        h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(-1, nh, hd).transpose(0, 1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(-1, nh, hd).transpose(0, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(-1, nh, hd).transpose(0, 1)
        cos, sin = rope_cos_sin(positions, hd, cfg.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if len(cache) > i:
                k = torch.cat([cache[i][0], k], dim=1)
                v = torch.cat([cache[i][1], v], dim=1)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
        scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
        if allowed is not None:
            scores = scores.masked_fill(~allowed[None], torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores.to(torch.float32), dim=-1).to(q.dtype)
        out = (attn @ v).transpose(0, 1).reshape(-1, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        x = x + out
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        up = h @ w[p + "mlp.up_proj.weight"].T
        return x + (gate * up) @ w[p + "mlp.down_proj.weight"].T

    def __call__(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor | None = None,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        record: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        for i in range(self.num_layers):
            if record is not None:
                record.append(x)
            x = self.layer(i, x, positions, allowed, cache)
        return x


# --- the speech decoder -------------------------------------------------------------------------------


class ReferenceDecoder:
    """Upstream's NAR + AR speech decoder on one utterance at a time, float32 unless told otherwise."""

    def __init__(
        self, cfg: DecoderConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ):
        require(weights, decoder_shapes(cfg), "decoder/final.pt")
        self.cfg = cfg
        self.w = {k: v.to(dtype) for k, v in weights.items() if k in decoder_shapes(cfg)}
        self.dtype = dtype
        self.pre_nn = LlamaStack(self.w, "layers_pre_nn.", cfg.num_pre_nn_layers, cfg)
        self.ar = LlamaStack(self.w, "layers.", cfg.num_layers, cfg)

    @classmethod
    def load(cls, ckpt: TTSCheckpoint, dtype: torch.dtype = torch.float32) -> ReferenceDecoder:
        return cls(ckpt.decoder, map_decoder_names(safe_load(ckpt.decoder_weights)), dtype)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.w["embedding.weight"][token_ids]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        h = rms_norm(hidden, self.w["norm.weight"], self.cfg.rms_norm_eps)
        return h @ self.w["out_fnn.weight"].T + self.w["out_fnn.bias"]

    @torch.no_grad()
    def nar(self, x: torch.Tensor) -> torch.Tensor:
        """pre_nn over the (T, idim) input vectors, bidirectional."""
        x = x.to(self.dtype)
        return self.pre_nn(x, torch.arange(x.shape[0]))

    @torch.no_grad()
    def prompt(self, x: torch.Tensor) -> torch.Tensor:
        """The AR prompt `[bos_emb, pre_nn(x)]`, (T + 1, hidden)."""
        bos = self.embed(torch.tensor([self.cfg.bos_id]))
        return torch.cat([bos, self.nar(x)], dim=0)

    @torch.no_grad()
    def prompt_layer_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(T + 1, num_layers, hidden): each AR layer's input at every prompt position (bidirectional pass).

        These determine the prompt's keys and values in every layer, i.e. the whole KV cache the AR steps read.
        """
        prompt = self.prompt(x)
        record: list[torch.Tensor] = []
        self.ar(prompt, torch.arange(prompt.shape[0]), None, None, record)
        return torch.stack(record, dim=1)

    @torch.no_grad()
    def forced_logits(self, x: torch.Tensor, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits after sos and after each forced token: (len(tokens) + 1, vocab), one masked pass (prefix LM)."""
        prompt = self.prompt(x)
        n = prompt.shape[0]
        ids = torch.tensor([self.cfg.sos_id, *[int(t) for t in tokens]])
        seq = torch.cat([prompt, self.embed(ids)], dim=0)
        total = seq.shape[0]
        allowed = torch.zeros(total, total, dtype=torch.bool)
        allowed[:n, :n] = True  # the prompt sees itself, both ways
        allowed[n:, :n] = True  # sos and tokens see the whole prompt
        allowed[n:, n:] = torch.ones(total - n, total - n, dtype=torch.bool).tril()  # and earlier tokens
        hidden = self.ar(seq, torch.arange(total), allowed)
        return self.head(hidden[n:])

    @torch.no_grad()
    def generate(
        self,
        x: torch.Tensor,
        top_k: int = 2,
        penalty_window: int = -1,
        penalty: float = 1.1,
        max_tokens: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Upstream's `infer`: yields codec tokens until eos (not yielded) or max_tokens."""
        prompt = self.prompt(x)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ar(prompt, torch.arange(prompt.shape[0]), None, cache)
        position = prompt.shape[0]
        generated = [self.cfg.sos_id]
        token = self.cfg.sos_id
        for _ in range(max_tokens):
            hidden = self.ar(self.embed(torch.tensor([token])), torch.tensor([position]), None, cache)
            position += 1
            logits = self.head(hidden)[0]
            token = sample_next(logits, generated, top_k, penalty_window, penalty, generator)
            generated.append(token)
            if token == self.cfg.eos_id:
                return
            yield token


def apply_penalty(logits: torch.Tensor, generated: list[int], window: int, penalty: float) -> torch.Tensor:
    """Upstream's penalty: divide the logit of each token in the last `window` (once per occurrence)."""
    logits = logits.clone()
    if window > 0:
        for token in generated[-window:]:
            logits[token] = logits[token] / penalty
    return logits


def top_k_probs(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    top, idx = torch.topk(probs, top_k)
    out = torch.zeros_like(probs).scatter_(0, idx, top)
    return out / out.sum()


def sample_next(
    logits: torch.Tensor,
    generated: list[int],
    top_k: int,
    penalty_window: int,
    penalty: float,
    generator: torch.Generator | None = None,
) -> int:
    probs = top_k_probs(apply_penalty(logits, generated, penalty_window, penalty), top_k)
    return int(torch.multinomial(probs, 1, generator=generator))


def text_vectors(llm_embedding_rows: torch.Tensor, idim: int) -> torch.Tensor:
    """LLM input-embedding rows (T, H) -> (T * H / idim, idim): upstream's `reshape(-1, 896)`."""
    if llm_embedding_rows.shape[-1] % idim:
        raise ValueError(
            f"the LLM hidden size {llm_embedding_rows.shape[-1]} is not a multiple of the speech "
            f"decoder's input width {idim}"
        )
    return llm_embedding_rows.reshape(-1, idim)


# --- TiCodec decoder ----------------------------------------------------------------------------------


def _padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ReferenceCodec:
    """TiCodec's decoder side: codes (B, T) -> waveform (B, 1, T * samples_per_token) at 24 kHz."""

    def __init__(
        self, cfg: CodecConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ):
        shapes = codec_shapes(cfg)
        require(weights, shapes, "codec/final.pt")
        self.cfg = cfg
        self.w = {k: v.to(dtype) for k, v in weights.items() if k in shapes}
        self.dtype = dtype
        self.global_features = self._global_features()

    @classmethod
    def load(cls, ckpt: TTSCheckpoint, dtype: torch.dtype = torch.float32) -> ReferenceCodec:
        return cls(ckpt.codec, map_codec_names(safe_load(ckpt.codec_weights)), dtype)

    def _global_features(self) -> torch.Tensor:
        """The fixed voice: the global tokens' codebook vectors concatenated, (1, 128)."""
        parts = [
            self.w[f"quantizer.quantizer_modules_globaltokens.{j}.embedding.weight"][t]
            for j, t in enumerate(self.cfg.global_tokens)
        ]
        return torch.cat(parts)[None]

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) single-codebook codes -> (B, 512, T)."""
        return self.w["quantizer.quantizer_modules.0.embedding.weight"][codes].transpose(1, 2)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        g = "generator."
        x = F.conv1d(self.embed(codes), w[g + "conv_pre.weight"], w[g + "conv_pre.bias"], padding=3)
        nk = len(cfg.resblock_kernel_sizes)
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
            x = F.leaky_relu(x, LRELU_SLOPE)
            x = F.conv_transpose1d(
                x, w[f"{g}ups.{i}.weight"], w[f"{g}ups.{i}.bias"], stride=u, padding=(k - u) // 2
            )
            total = None
            for j, (rk, dil) in enumerate(
                zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
            ):
                y = self._resblock(x, f"{g}resblocks.{i * nk + j}.", rk, dil)
                total = y if total is None else total + y
            assert total is not None
            x = total / nk
            if x.shape[-2] == self.global_features.shape[-1]:
                x = x + self.global_features[..., None]
        x = F.leaky_relu(x, LRELU_SLOPE)
        x = F.conv1d(x, w[g + "conv_post.weight"], w[g + "conv_post.bias"], padding=3)
        return torch.tanh(x)

    def _resblock(self, x: torch.Tensor, p: str, kernel: int, dilations: tuple[int, ...]) -> torch.Tensor:
        w = self.w
        if self.cfg.resblock == "1":
            for m in range(3):
                t = F.conv1d(
                    F.leaky_relu(x, LRELU_SLOPE),
                    w[f"{p}convs1.{m}.weight"],
                    w[f"{p}convs1.{m}.bias"],
                    dilation=dilations[m],
                    padding=_padding(kernel, dilations[m]),
                )
                t = F.conv1d(
                    F.leaky_relu(t, LRELU_SLOPE),
                    w[f"{p}convs2.{m}.weight"],
                    w[f"{p}convs2.{m}.bias"],
                    padding=_padding(kernel, 1),
                )
                x = x + t
            return x
        for m in range(2):
            t = F.conv1d(
                F.leaky_relu(x, LRELU_SLOPE),
                w[f"{p}convs.{m}.weight"],
                w[f"{p}convs.{m}.bias"],
                dilation=dilations[m],
                padding=_padding(kernel, dilations[m]),
            )
            x = x + t
        return x
