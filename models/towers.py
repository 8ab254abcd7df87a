"""VITA's vision and audio encoder towers as plain torch modules.

Used by both the vLLM model class and the pure-torch reference, so this file imports torch only (no vLLM,
transformers, torchvision or torchaudio). Parameter names are the vLLM deployment names; the checkpoint
loader maps the published names onto them by prefix (research/vita_weights.md):

- ``InternVisionModel``: InternViT-300M-448px (checkpoint ``model.vision_tower.vision_tower.*``).
- ``pixel_shuffle`` / ``vision_features_to_tokens``: CLS drop, VITA's x0.5 quirk, 2x2 space-to-depth.
- ``VisionProjector``: ``mlp2x_gelu`` (checkpoint ``model.mm_projector.{0,2}``).
- ``WhaleAudioEncoder``: conv subsampling x4, then a pre-norm Transformer with Transformer-XL relative
  attention (checkpoint ``model.audio_encoder.encoder.enc.*``; ``global_cmvn`` lives in the feature
  extractor instead).
- ``AudioProjector``: right pad, Conv1d stride 2, LayerNorm, GELU, Linear (checkpoint ``...adpter.*``).

Where the public sources were ambiguous, and what we chose. Sources: VITA training code @360de22
(``vita/model/multimodal_encoder/{internvit,whale}``) and its vLLM deployment
(``web_demo/vllm_tools/vllm_file/{mixtral,whale}.py``).

1. Whale position encoding. The checkpoint has ``linear_pos``/``pos_bias_u/v``, i.e. ``rel-enc``, whose
   ``RelPositionalEncoding.forward`` overrides the absolute one: it returns ``x * sqrt(d)`` and the table
   rows *separately*. The rows are NOT added to ``x``; they enter only through ``linear_pos`` in every
   layer. Training and vLLM agree, so we do not add them.
2. No ``rel_shift`` (WeNet's speech variant; commented out in both sources):
   ``matrix_bd = (q + v) . (W_pos pe[t])^T`` with ``pe`` the plain sinusoid rows 0..T'-1.
3. Attention mask. Training's ``Transformer.forward`` builds its mask with ``add_optional_chunk_mask``,
   set by ``train.yaml`` (``models/audio_encoder_config.py`` reads it):
   - dynamic chunks (``transformer-dynamic-chunks``, upstream's default): a chunk size drawn at random on
     every forward, in eval too, so upstream's own output is not deterministic. VITA's vLLM port and its
     serving attend over all valid frames (key padding mask only), and so do we: ``chunk_size = -1``.
   - static chunks (``chunk_size > 0``): every frame sees its own chunk and ``left_chunks`` chunks to the
     left (all when < 0), at the subsampled frame rate, ANDed with the key padding mask
     (``chunk_attention_mask``). Padded query rows, whose outputs are discarded, see every valid key so that
     no row is empty.
   Training fills masked scores with fp16-min and zeroes them after softmax, vLLM uses -inf: the same on
   valid rows.
4. LayerNorm eps. Training builds every whale LayerNorm with torch's default 1e-5; vLLM uses the config
   value for the layer norms but 1e-5 for the embed block. We use ``layer_norm_eps`` (default 1e-5) for
   the layer/final norms and a fixed 1e-5 for the embed block, matching both.
5. Adapter padding. The module named ``left_padding2`` in both sources pads on the RIGHT by
   ``kernel_size - 1``. In a batch, frames past a clip's length are zeroed first (both sources), so a
   padded batch gives the same tokens as the clip alone.
6. InternViT always runs the position grid through bicubic interpolation, even at the trained size. With
   ``align_corners=False`` and scale 1 the cubic weights are exactly [0, 1, 0, 0], so that is the
   identity; we interpolate only when the grid differs (tested).
7. "gelu" is the exact (erf) GELU everywhere: HF ``ACT2FN["gelu"]`` in InternViT and both projectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import InvalidAudioError

__all__ = [
    "AudioProjector",
    "InternVisionModel",
    "VisionProjector",
    "WhaleAudioEncoder",
    "audio_output_lengths",
    "chunk_attention_mask",
    "encode_audio",
    "encode_images",
    "pixel_shuffle",
    "subsampled_lengths",
    "vision_features_to_tokens",
]

# VITA's InternViTVisionTower.scale_pix_shuffle: a constant, independent of downsample_ratio.
VISION_FEATURE_SCALE = 0.5

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; accepted: {sorted(_ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------------------------------
# Vision: InternViT
# ----------------------------------------------------------------------------------------------------


class InternVisionEmbeddings(nn.Module):
    """Patch conv + CLS token + learned absolute positions (bicubically resized for other grids)."""

    def __init__(self, hidden_size: int, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, self.grid * self.grid + 1, hidden_size) * 0.02)

    def _patch_positions(self, height: int, width: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        if (height, width) == (self.grid, self.grid):
            return pos
        # As InternViT: resize in float32, then back to the parameter dtype.
        grid = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (N, H, gh, gw)
        n, _, gh, gw = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(n, 1, -1).to(dtype)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(gh, gw)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as InternViT
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class InternMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.act = _activation(hidden_act)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block with per-channel layer scale on both residual branches (ls1, ls2)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        layer_norm_eps: float,
        qkv_bias: bool,
        hidden_act: str,
    ) -> None:
        super().__init__()
        self.attn = InternAttention(hidden_size, num_heads, qkv_bias)
        self.mlp = InternMLP(hidden_size, intermediate_size, hidden_act)
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        # InternViT initialises layer scale to initializer_factor (0.1); the checkpoint overrides it.
        self.ls1 = nn.Parameter(torch.full((hidden_size,), 0.1))
        self.ls2 = nn.Parameter(torch.full((hidden_size,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, num_layers: int, make_layer: Callable[[], InternVisionEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make_layer() for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    """InternViT; ``forward`` returns the last hidden state (N, 1 + grid², H) with CLS first.

    No pooler and no post-norm, so this equals InternViT's ``hidden_states[-1]`` (VITA's select_layer -1).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        image_size: int = 448,
        patch_size: int = 14,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        hidden_act: str = "gelu",
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.embeddings = InternVisionEmbeddings(hidden_size, image_size, patch_size)
        self.encoder = InternVisionEncoder(
            num_hidden_layers,
            lambda: InternVisionEncoderLayer(
                hidden_size, intermediate_size, num_attention_heads, layer_norm_eps, qkv_bias, hidden_act
            ),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (N, 3, H, W); got {tuple(pixel_values.shape)}")
        return self.encoder(self.embeddings(pixel_values))


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle: (N, w, h, C) -> (N, w·s, h·s, C/s²).

    With s = 1/2: ``out[n, i, j, (2·di + dj)·C + c] == x[n, 2i + di, 2j + dj, c]``. The two view/permute
    steps are InternVL's own, kept so the channel order matches the trained projector.
    """
    n, w, h, c = x.shape
    inv = round(1 / scale_factor)
    if abs(inv * scale_factor - 1) > 1e-9 or w % inv or h % inv:
        raise ValueError(
            f"pixel_shuffle needs 1/scale_factor integral dividing the grid; got {scale_factor}, {w}x{h}"
        )
    x = x.reshape(n, w, h // inv, c * inv)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, h // inv, w // inv, c * inv * inv)
    return x.permute(0, 2, 1, 3).contiguous()


def vision_features_to_tokens(hidden: torch.Tensor, downsample_ratio: float = 0.5) -> torch.Tensor:
    """(N, 1 + hw, H) last hidden state -> (N, hw·r², H/r²) tokens for the projector."""
    patches = hidden[:, 1:]
    n, hw, c = patches.shape
    side = math.isqrt(hw)
    if side * side != hw:
        raise ValueError(f"expected a square patch grid; got {hw} patches")
    grid = patches.reshape(n, side, side, c)
    # VITA's scale_pix_shuffle quirk: the features are halved before the shuffle. The projector was trained on
    # halved features (training and the vLLM deployment both do it), so dropping it would shift every input.
    grid = pixel_shuffle(grid * VISION_FEATURE_SCALE, downsample_ratio)
    return grid.reshape(n, -1, grid.shape[-1])


class VisionProjector(nn.Module):
    """mlp2x_gelu: Linear, GELU, Linear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------------
# Audio: whale encoder + adapter
# ----------------------------------------------------------------------------------------------------


def subsampled_lengths(num_frames: torch.Tensor | int) -> torch.Tensor | int:
    """Frames after the two stride-2, kernel-3 convs: ((T - 1)//2 - 1)//2 (also the mask's [2::2][2::2])."""
    return ((num_frames - 1) // 2 - 1) // 2


def chunk_attention_mask(
    num_frames: int, chunk_size: int, left_chunks: int = -1, device: torch.device | None = None
) -> torch.Tensor:
    """Whale's static chunk mask: (T, T) bool, True where query frame i may attend to key frame j.

    Frame i lies in chunk ``i // chunk_size`` and sees the keys of that chunk and of the ``left_chunks``
    chunks before it (every earlier chunk when ``left_chunks < 0``); the last chunk may be short. Frames
    are the subsampled ones (after the x4 convs), as upstream builds it. Upstream writes it row by row
    (``subsequent_chunk_mask``); comparing chunk indices gives the same matrix in one step.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 for a chunk mask; got {chunk_size} (<= 0: full attention)")
    chunk = torch.arange(num_frames, device=device) // chunk_size
    behind = chunk[:, None] - chunk[None, :]  # how many chunks key j lies behind query i
    allowed = behind >= 0
    if left_chunks >= 0:
        allowed &= behind <= left_chunks
    return allowed


def audio_output_lengths(num_frames: torch.Tensor | int) -> torch.Tensor | int:
    """LLM tokens for T fbank frames: t1 = ((T-1)//2 - 1)//2, n = (t1 - 1)//2 + 1 (0 when T < 7)."""
    t1 = subsampled_lengths(num_frames)
    return (t1 - 1) // 2 + 1


def _sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """(max_len, dim) table: sin on even, cos on odd channels; float32 on the CPU, as the sources build it."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class WhaleConv2dSubsampling4(nn.Module):
    """(B, T, F) -> (B, T', H): two Conv2d(k3, s2) + ReLU over (time, freq), Linear over channels×freq."""

    def __init__(self, input_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.conv_in = nn.Sequential(
            nn.Conv2d(1, hidden_size, kernel_size=3, stride=2),
            nn.ReLU(),
            nn.Conv2d(hidden_size, hidden_size, kernel_size=3, stride=2),
            nn.ReLU(),
        )
        self.out = nn.Linear(hidden_size * (((input_dim - 1) // 2 - 1) // 2), hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f))  # channel-major flatten, as the sources


class WhaleAudioEmbeddings(nn.Module):
    """Linear, LayerNorm, (dropout), ReLU, then ×√H; also returns the position rows for the attention."""

    def __init__(self, hidden_size: int, max_position: int) -> None:
        super().__init__()
        # Index 2 is the (inference-inert) dropout of the sources; kept as Identity so ReLU stays at index 3.
        self.embedding = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.LayerNorm(hidden_size, eps=1e-5),
            nn.Identity(),
            nn.ReLU(),
        )
        self.xscale = math.sqrt(hidden_size)
        self.max_position = max_position
        # Plain attribute (as the sources): not in state_dict, not cast by Module.to(dtype), and never left
        # on the meta device by a lazy-init loader. Moved to the input's device on first use.
        self._pe = _sinusoid_table(max_position, hidden_size)

    def position_rows(self, length: int, device: torch.device) -> torch.Tensor:
        if length > self.max_position:
            raise InvalidAudioError(
                f"audio too long: {length} subsampled frames; at most {self.max_position} are accepted"
            )
        if self._pe.device != device:
            # A normal tensor even when first called under inference_mode, so later autograd use still works.
            with torch.inference_mode(False):
                self._pe = self._pe.to(device)
        return self._pe[:length].unsqueeze(0)  # (1, T', H) float32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # rel-enc: the position rows are NOT added to x (module docstring, point 1).
        x = self.embedding(x) * self.xscale
        return x, self.position_rows(x.shape[1], x.device)


class WhaleRelAttention(nn.Module):
    """Transformer-XL attention without rel_shift: scores = ((q+u)kᵀ + (q+v)pᵀ) / √d_k."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.d_k = hidden_size // num_heads
        self.linear_q = nn.Linear(hidden_size, hidden_size)
        self.linear_k = nn.Linear(hidden_size, hidden_size)
        self.linear_v = nn.Linear(hidden_size, hidden_size)
        self.linear_out = nn.Linear(hidden_size, hidden_size)
        self.linear_pos = nn.Linear(hidden_size, hidden_size, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(
        self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask``: True where attending is allowed; (B, T) over keys (padding) or (B, T, T) query × key
        (chunks). None = full attention, SDPA's fast path."""
        b, t, c = x.shape
        # q stays (B, T, h, d) so the (h, d) position biases broadcast.
        q = self.linear_q(x).view(b, t, self.num_heads, self.d_k)
        k = self.linear_k(x).view(b, t, self.num_heads, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.num_heads, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb.to(x.dtype)).view(1, t, self.num_heads, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        # SDPA computes (q_u kᵀ)/√d + bias; the position term (q_v pᵀ)/√d rides in as that bias.
        bias = torch.matmul(q_v, p.transpose(-2, -1)) / math.sqrt(self.d_k)  # (B, h, T, T)
        if mask is not None:
            allowed = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
            bias = bias.masked_fill(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias)
        return self.linear_out(out.transpose(1, 2).reshape(b, t, c))


class WhaleFeedForward(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, intermediate_size)
        self.w_2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class WhaleEncoderLayer(nn.Module):
    """Pre-norm (normalize_before=True, concat_after=False) Transformer layer."""

    def __init__(
        self, hidden_size: int, num_heads: int, intermediate_size: int, layer_norm_eps: float
    ) -> None:
        super().__init__()
        self.self_attn = WhaleRelAttention(hidden_size, num_heads)
        self.feed_forward = WhaleFeedForward(hidden_size, intermediate_size)
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), pos_emb, mask)
        return x + self.feed_forward(self.norm2(x))


class WhaleEncoderStack(nn.Module):
    def __init__(
        self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int, layer_norm_eps: float
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            WhaleEncoderLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos_emb, mask)
        return self.layer_norm(x)


class WhaleAudioEncoder(nn.Module):
    """Whale speech encoder: (B, T, 80) CMVN-normalised fbank -> (B, T', H), T' = ((T-1)//2 - 1)//2.

    ``chunk_size > 0`` turns on upstream's static chunk attention (module docstring, point 3); the default
    -1 is full attention, as VITA's vLLM port.
    """

    def __init__(
        self,
        input_dim: int = 80,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        max_position: int = 5000,
        layer_norm_eps: float = 1e-5,
        chunk_size: int = -1,
        left_chunks: int = -1,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.hidden_size = hidden_size
        self.chunk_size = chunk_size
        self.left_chunks = left_chunks
        self.subsampling = WhaleConv2dSubsampling4(input_dim, hidden_size)
        self.embeddings = WhaleAudioEmbeddings(hidden_size, max_position)
        self.encoder = WhaleEncoderStack(
            num_hidden_layers, hidden_size, num_attention_heads, intermediate_size, layer_norm_eps
        )

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden (B, T', H), output lengths (B,)); ``lengths``: valid frames per right-padded row.

        Valid outputs never see padded frames: output t reads frames 4t..4t+6, and 4(t1-1)+6 <= T-1.
        """
        if features.dim() != 3 or features.shape[-1] != self.input_dim:
            raise InvalidAudioError(f"features must be (B, T, {self.input_dim}); got {tuple(features.shape)}")
        batch, frames, _ = features.shape
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=features.device)
        lengths = lengths.to(device=features.device, dtype=torch.long)
        if frames < 7 or int(lengths.min()) < 7:
            raise InvalidAudioError(
                f"audio needs at least 7 fbank frames (~85 ms); got lengths {lengths.tolist()}"
            )
        if int(lengths.max()) > frames:
            raise InvalidAudioError(f"lengths {lengths.tolist()} exceed the {frames} frames given")

        dtype = self.subsampling.out.weight.dtype
        x = self.subsampling(features.to(dtype))
        out_lengths = subsampled_lengths(lengths)
        mask = self.attention_mask(out_lengths, x.shape[1])
        x, pos_emb = self.embeddings(x)
        return self.encoder(x, pos_emb, mask), out_lengths

    def attention_mask(self, out_lengths: torch.Tensor, num_frames: int) -> torch.Tensor | None:
        """What every layer may attend to, built once per forward at the subsampled rate: None (full
        attention), (B, T') valid keys, or (B, T', T') with static chunks."""
        device = out_lengths.device
        padded = bool((out_lengths < num_frames).any())  # unbatched / equal lengths: no padding
        valid = torch.arange(num_frames, device=device)[None, :] < out_lengths[:, None] if padded else None
        if self.chunk_size <= 0:
            return valid  # None unless padded: lets SDPA use its fast path
        allowed = chunk_attention_mask(num_frames, self.chunk_size, self.left_chunks, device)[None]
        if valid is None:
            return allowed
        # Upstream ANDs the chunk mask with the key padding mask. A padded query row (its output is discarded)
        # may then see no key at all: an all -inf row is NaN in a plain softmax and in some SDPA kernels (recent
        # CPU ones return zeros), and NaN values would leak into valid rows through 0 * NaN in the weighted
        # sum. Such rows see every valid key instead, so the result does not depend on the kernel.
        return valid[:, None, :] & (allowed | ~valid[:, :, None])


class AudioProjector(nn.Module):
    """VITA's audio adapter (CNNSubsampling, single-conv branch): ×2 in time, encoder dim -> LLM dim."""

    def __init__(
        self, encoder_dim: int = 1024, llm_dim: int = 4096, hidden: int = 2048, kernel_size: int = 5
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1d = nn.Conv1d(encoder_dim, hidden, kernel_size=kernel_size, stride=2)
        self.norm = nn.LayerNorm(hidden, eps=1e-3)
        self.linear = nn.Linear(hidden, llm_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, t1, encoder_dim) -> (B, (t1 - 1)//2 + 1, llm_dim); row b is valid for its first
        ``(lengths[b] - 1)//2 + 1`` tokens."""
        x = x.to(self.conv1d.weight.dtype)
        if lengths is not None:
            # Zero frames past each clip's end so its last window sees the same zeros as the clip alone.
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
            x = x.masked_fill(~valid[..., None], 0.0)
        x = F.pad(x.transpose(1, 2), (0, self.kernel_size - 1))  # right pad ("left_padding2" in the sources)
        x = self.conv1d(x).transpose(1, 2)
        return self.linear(F.gelu(self.norm(x)))


# ----------------------------------------------------------------------------------------------------
# Helpers used by the model classes
# ----------------------------------------------------------------------------------------------------


def encode_images(
    vision_model: InternVisionModel,
    projector: VisionProjector,
    pixel_values: torch.Tensor,
    downsample_ratio: float = 0.5,
) -> torch.Tensor:
    """(N, 3, S, S) tiles -> (N, tokens_per_tile, llm_dim) LLM embeddings (256 per 448² tile)."""
    hidden = vision_model(pixel_values)
    tokens = vision_features_to_tokens(hidden, downsample_ratio)
    return projector(tokens.to(projector.linear_1.weight.dtype))


def encode_audio(
    audio_encoder: WhaleAudioEncoder, audio_projector: AudioProjector, features: torch.Tensor
) -> torch.Tensor:
    """One clip's (T, 80) CMVN-normalised fbank -> (n, llm_dim), n = audio_output_lengths(T).

    Unbatched on purpose: one clip at a time needs no padding mask.
    """
    if features.dim() != 2:
        raise InvalidAudioError(
            f"encode_audio takes one clip (T, {audio_encoder.input_dim}); got {tuple(features.shape)}"
        )
    hidden, _ = audio_encoder(features.unsqueeze(0))
    tokens = audio_projector(hidden)[0]
    expected = audio_output_lengths(features.shape[0])
    if tokens.shape[0] != expected:  # the placeholder count in the prompt is computed with the formula
        raise RuntimeError(f"audio token count {tokens.shape[0]} disagrees with the formula ({expected})")
    return tokens
