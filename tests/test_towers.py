"""Tests for models/towers.py on tiny towers: names/shapes, token counts, pixel shuffle, masks, dtypes.

The whale chunk-mask tests compare the tower with `models.reference.whale_encoder_reference`, upstream's
eval forward written out in its own formulation (explicit softmax with fp16-min filling, masks sliced and
built row by row), and the mask with a loop-for-loop transcription of upstream's `subsequent_chunk_mask`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.config import VitaConfig
from models.encoders import make_audio_tower
from models.errors import InvalidAudioError
from models.reference import whale_encoder_reference
from models.towers import (
    AudioProjector,
    InternVisionModel,
    VisionProjector,
    WhaleAudioEncoder,
    audio_output_lengths,
    chunk_attention_mask,
    encode_audio,
    encode_images,
    pixel_shuffle,
    subsampled_lengths,
    vision_features_to_tokens,
)

H, I, LAYERS, HEADS, LLM = 64, 128, 2, 4, 32
IMAGE, PATCH = 56, 14  # 4x4 patch grid -> 4 tokens after the 0.5 pixel shuffle
ADAPTER_HIDDEN = 2 * H


def _vision() -> InternVisionModel:
    torch.manual_seed(0)
    return InternVisionModel(H, I, LAYERS, HEADS, image_size=IMAGE, patch_size=PATCH).eval()


def _audio() -> tuple[WhaleAudioEncoder, AudioProjector]:
    torch.manual_seed(1)
    enc = WhaleAudioEncoder(
        input_dim=80, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=I
    )
    proj = AudioProjector(encoder_dim=H, llm_dim=LLM, hidden=ADAPTER_HIDDEN, kernel_size=5)
    return enc.eval(), proj.eval()


@pytest.fixture(scope="module")
def vision() -> InternVisionModel:
    return _vision()


@pytest.fixture(scope="module")
def audio() -> tuple[WhaleAudioEncoder, AudioProjector]:
    return _audio()


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- names


def test_vision_state_dict_names_and_shapes(vision: InternVisionModel) -> None:
    grid = (IMAGE // PATCH) ** 2
    expected = {
        "embeddings.class_embedding": (1, 1, H),
        "embeddings.position_embedding": (1, grid + 1, H),
        "embeddings.patch_embedding.weight": (H, 3, PATCH, PATCH),
        "embeddings.patch_embedding.bias": (H,),
    }
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        expected |= {
            p + "ls1": (H,),
            p + "ls2": (H,),
            p + "attn.qkv.weight": (3 * H, H),
            p + "attn.qkv.bias": (3 * H,),
            p + "attn.proj.weight": (H, H),
            p + "attn.proj.bias": (H,),
            p + "mlp.fc1.weight": (I, H),
            p + "mlp.fc1.bias": (I,),
            p + "mlp.fc2.weight": (H, I),
            p + "mlp.fc2.bias": (H,),
            p + "norm1.weight": (H,),
            p + "norm1.bias": (H,),
            p + "norm2.weight": (H,),
            p + "norm2.bias": (H,),
        }
    assert _shapes(vision) == expected
    assert vision.encoder.layers[0].norm1.eps == 1e-6


def test_audio_state_dict_names_and_shapes(audio: tuple[WhaleAudioEncoder, AudioProjector]) -> None:
    enc, proj = audio
    f_sub = ((80 - 1) // 2 - 1) // 2
    assert f_sub == 19
    expected = {
        "subsampling.conv_in.0.weight": (H, 1, 3, 3),
        "subsampling.conv_in.0.bias": (H,),
        "subsampling.conv_in.2.weight": (H, H, 3, 3),
        "subsampling.conv_in.2.bias": (H,),
        "subsampling.out.weight": (H, H * f_sub),
        "subsampling.out.bias": (H,),
        "embeddings.embedding.0.weight": (H, H),
        "embeddings.embedding.0.bias": (H,),
        "embeddings.embedding.1.weight": (H,),
        "embeddings.embedding.1.bias": (H,),
        "encoder.layer_norm.weight": (H,),
        "encoder.layer_norm.bias": (H,),
    }
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            expected |= {p + f"self_attn.{lin}.weight": (H, H), p + f"self_attn.{lin}.bias": (H,)}
        expected |= {
            p + "self_attn.linear_pos.weight": (H, H),
            p + "self_attn.pos_bias_u": (HEADS, H // HEADS),
            p + "self_attn.pos_bias_v": (HEADS, H // HEADS),
            p + "feed_forward.w_1.weight": (I, H),
            p + "feed_forward.w_1.bias": (I,),
            p + "feed_forward.w_2.weight": (H, I),
            p + "feed_forward.w_2.bias": (H,),
            p + "norm1.weight": (H,),
            p + "norm1.bias": (H,),
            p + "norm2.weight": (H,),
            p + "norm2.bias": (H,),
        }
    assert _shapes(enc) == expected  # exact equality: no position table among them
    assert not any("pe" in k.split(".")[-1] for k in enc.state_dict())
    assert list(enc.buffers()) == []

    assert _shapes(proj) == {
        "conv1d.weight": (ADAPTER_HIDDEN, H, 5),
        "conv1d.bias": (ADAPTER_HIDDEN,),
        "norm.weight": (ADAPTER_HIDDEN,),
        "norm.bias": (ADAPTER_HIDDEN,),
        "linear.weight": (LLM, ADAPTER_HIDDEN),
        "linear.bias": (LLM,),
    }
    assert proj.norm.eps == 1e-3


def test_full_size_audio_projector_shapes() -> None:
    proj = AudioProjector(encoder_dim=1024, llm_dim=3584)
    assert _shapes(proj)["conv1d.weight"] == (2048, 1024, 5)
    assert _shapes(proj)["linear.weight"] == (3584, 2048)


def test_vision_projector_names() -> None:
    assert _shapes(VisionProjector(4 * H, LLM)) == {
        "linear_1.weight": (LLM, 4 * H),
        "linear_1.bias": (LLM,),
        "linear_2.weight": (LLM, LLM),
        "linear_2.bias": (LLM,),
    }


# ---------------------------------------------------------------------------------------------------- vision


def test_vision_shapes(vision: InternVisionModel) -> None:
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    hidden = vision(pixels)
    assert hidden.shape == (2, 1 + 16, H)
    tokens = vision_features_to_tokens(hidden, 0.5)
    assert tokens.shape == (2, 4, 4 * H)
    proj = VisionProjector(4 * H, LLM)
    out = encode_images(vision, proj, pixels, 0.5)
    assert out.shape == (2, 4, LLM)
    assert torch.allclose(out, proj(tokens))


def test_pixel_shuffle_hand_example() -> None:
    # (1, 2, 2, 1) grid [[a, b], [c, d]] -> one position holding [a, b, c, d].
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    assert pixel_shuffle(x, 0.5).tolist() == [[[[1.0, 2.0, 3.0, 4.0]]]]
    # Two channels: channel runs stay together, grid order (0,0), (0,1), (1,0), (1,1).
    x = torch.tensor([[[1.0, 10.0], [2.0, 20.0]], [[3.0, 30.0], [4.0, 40.0]]]).reshape(1, 2, 2, 2)
    assert pixel_shuffle(x, 0.5).flatten().tolist() == [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0]


def test_pixel_shuffle_matches_index_formula_non_square() -> None:
    n, w, h, c = 2, 4, 6, 3
    x = torch.arange(n * w * h * c, dtype=torch.float32).reshape(n, w, h, c)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (n, w // 2, h // 2, 4 * c)
    for b in range(n):
        for i in range(w // 2):
            for j in range(h // 2):
                for di in range(2):
                    for dj in range(2):
                        for ch in range(c):
                            assert out[b, i, j, (2 * di + dj) * c + ch] == x[b, 2 * i + di, 2 * j + dj, ch]


def test_pixel_shuffle_matches_internvl_view_permute() -> None:
    # InternVL's literal sequence of views and permutes on a contiguous tensor.
    x = torch.randn(3, 8, 8, 5)
    n, w, h, c = x.shape
    y = x.view(n, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    y = y.view(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    assert torch.equal(pixel_shuffle(x, 0.5), y)


def test_vision_features_are_halved_before_shuffle() -> None:
    torch.manual_seed(3)
    hidden = torch.randn(2, 1 + 16, H)
    unscaled = pixel_shuffle(hidden[:, 1:].reshape(2, 4, 4, H), 0.5).reshape(2, 4, 4 * H)
    tokens = vision_features_to_tokens(hidden, 0.5)
    assert torch.equal(tokens * 2, unscaled)  # ×0.5 is exact in binary floating point
    # CLS is dropped: changing it changes nothing.
    hidden2 = hidden.clone()
    hidden2[:, 0] += 100
    assert torch.equal(vision_features_to_tokens(hidden2, 0.5), tokens)


def test_same_size_bicubic_is_identity() -> None:
    # Why the trained-size path may skip InternViT's always-on interpolation.
    torch.manual_seed(4)
    grid = torch.randn(1, H, 32, 32)
    assert torch.equal(F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False), grid)


def test_vision_interpolates_positions_for_other_grids(vision: InternVisionModel) -> None:
    pixels = torch.randn(1, 3, 84, 84)  # 6x6 grid vs the 4x4 position table
    hidden = vision(pixels)
    assert hidden.shape == (1, 37, H)
    assert vision_features_to_tokens(hidden, 0.5).shape == (1, 9, 4 * H)


def _naive_vision_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    b, t, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
    weights = ((q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, t, c))


def test_vision_layer_matches_naive() -> None:
    layer = _vision().encoder.layers[0]
    x = torch.randn(2, 17, H)
    with torch.no_grad():
        layer.ls1.uniform_(0.5, 1.5)
        layer.ls2.uniform_(0.5, 1.5)
        torch.testing.assert_close(
            layer.attn(x), _naive_vision_attention(layer.attn, x), rtol=1e-5, atol=1e-5
        )
        # Pre-norm residuals, each branch scaled per channel by its layer scale.
        expected = x + _naive_vision_attention(layer.attn, layer.norm1(x)) * layer.ls1
        expected = expected + layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.norm2(expected)))) * layer.ls2
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize(("samples", "frames", "tokens"), [(24000, 148, 18), (160000, 998, 124)])
def test_audio_token_counts(
    audio: tuple[WhaleAudioEncoder, AudioProjector], samples: int, frames: int, tokens: int
) -> None:
    # Kaldi fbank at 16 kHz, 25 ms window (400), 10 ms shift (160), snip_edges: 1 + (n - 400) // 160 frames.
    assert 1 + (samples - 400) // 160 == frames
    assert audio_output_lengths(frames) == tokens
    assert audio_output_lengths(torch.tensor([frames])).tolist() == [tokens]
    enc, proj = audio
    with torch.no_grad():
        feats = torch.randn(frames, 80)
        hidden, lengths = enc(feats[None])
        assert hidden.shape == (1, subsampled_lengths(frames), H)
        assert lengths.tolist() == [subsampled_lengths(frames)]
        out = encode_audio(enc, proj, feats)
    assert out.shape == (tokens, LLM)


def test_audio_output_lengths_formula_small() -> None:
    counts = [audio_output_lengths(t) for t in range(20)]
    assert all(c == 0 for c in counts[:7])
    assert counts[7] == 1
    assert torch.equal(audio_output_lengths(torch.arange(20)), torch.tensor(counts))


def test_audio_too_short_is_rejected(audio: tuple[WhaleAudioEncoder, AudioProjector]) -> None:
    enc, proj = audio
    with pytest.raises(InvalidAudioError):
        encode_audio(enc, proj, torch.randn(6, 80))
    with pytest.raises(InvalidAudioError):
        encode_audio(enc, proj, torch.randn(1, 50, 80))


def test_padded_batch_equals_clips_alone(audio: tuple[WhaleAudioEncoder, AudioProjector]) -> None:
    enc, proj = audio
    torch.manual_seed(5)
    frame_lengths = [148, 97, 60, 151]
    clips = [torch.randn(n, 80) for n in frame_lengths]
    batch = torch.zeros(len(clips), max(frame_lengths), 80)
    for i, clip in enumerate(clips):
        batch[i, : clip.shape[0]] = clip
        batch[i, clip.shape[0] :] = 7.0  # garbage padding must not leak into valid outputs
    with torch.no_grad():
        hidden, enc_lengths = enc(batch, torch.tensor(frame_lengths))
        tokens = proj(hidden, enc_lengths)
        unmasked = proj(enc(batch)[0])
        for i, clip in enumerate(clips):
            n = audio_output_lengths(clip.shape[0])
            assert enc_lengths[i] == subsampled_lengths(clip.shape[0])
            alone = encode_audio(enc, proj, clip)
            assert alone.shape[0] == n
            torch.testing.assert_close(tokens[i, :n], alone, rtol=1e-5, atol=1e-5)
        # Sanity: without the mask the shorter clips differ, so the mask is what made them equal.
        assert not torch.allclose(
            unmasked[2, : audio_output_lengths(60)], tokens[2, : audio_output_lengths(60)]
        )


def test_whale_attention_matches_reference_math(audio: tuple[WhaleAudioEncoder, AudioProjector]) -> None:
    """Transformer-XL scores without rel_shift, written out as in the training code (fp16-min fill)."""
    enc, _ = audio
    attn = enc.encoder.layers[0].self_attn
    torch.manual_seed(6)
    b, t, d_k = 2, 9, H // HEADS
    x = torch.randn(b, t, H)
    pos = enc.embeddings.position_rows(t, x.device)
    key_mask = torch.arange(t)[None, :] < torch.tensor([[9], [5]])
    with torch.no_grad():
        q = attn.linear_q(x).view(b, t, HEADS, d_k)
        k = attn.linear_k(x).view(b, t, HEADS, d_k).transpose(1, 2)
        v = attn.linear_v(x).view(b, t, HEADS, d_k).transpose(1, 2)
        p = attn.linear_pos(pos).view(1, t, HEADS, d_k).transpose(1, 2)
        ac = (q + attn.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
        bd = (q + attn.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)
        scores = (ac + bd) / math.sqrt(d_k)
        masked = ~key_mask[:, None, None, :]
        weights = (
            scores.masked_fill(masked, torch.finfo(torch.float16).min).softmax(-1).masked_fill(masked, 0.0)
        )
        ref = attn.linear_out((weights @ v).transpose(1, 2).reshape(b, t, H))
        torch.testing.assert_close(attn(x, pos, key_mask), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn(x[:1], pos), ref[:1], rtol=1e-5, atol=1e-5)


def test_rel_positions_not_added_to_embeddings(audio: tuple[WhaleAudioEncoder, AudioProjector]) -> None:
    enc, _ = audio
    x = torch.randn(1, 12, H)
    with torch.no_grad():
        out, pos = enc.embeddings(x)
        torch.testing.assert_close(out, enc.embeddings.embedding(x) * math.sqrt(H))
    assert pos.shape == (1, 12, H)
    assert pos.dtype == torch.float32
    assert torch.equal(pos[0, 0, 0::2], torch.zeros(H // 2))  # sin(0)
    assert torch.equal(pos[0, 0, 1::2], torch.ones(H // 2))  # cos(0)
    assert isinstance(enc.embeddings.embedding[3], torch.nn.ReLU)


def test_audio_projector_right_pads(audio: tuple[WhaleAudioEncoder, AudioProjector]) -> None:
    _, proj = audio
    x = torch.randn(1, 11, H)
    with torch.no_grad():
        conv = F.conv1d(F.pad(x.transpose(1, 2), (0, 4)), proj.conv1d.weight, proj.conv1d.bias, stride=2)
        ref = proj.linear(F.gelu(proj.norm(conv.transpose(1, 2))))
        out = proj(x)
    assert out.shape == (1, (11 - 1) // 2 + 1, LLM)
    torch.testing.assert_close(out, ref)


def test_deterministic(vision: InternVisionModel, audio: tuple[WhaleAudioEncoder, AudioProjector]) -> None:
    enc, proj = audio
    feats = torch.randn(148, 80)
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    vproj = VisionProjector(4 * H, LLM)
    with torch.no_grad():
        assert torch.equal(encode_audio(enc, proj, feats), encode_audio(enc, proj, feats))
        assert torch.equal(encode_images(vision, vproj, pixels), encode_images(vision, vproj, pixels))
    # Same seed, same weights.
    assert all(
        torch.equal(a, b) for a, b in zip(_vision().state_dict().values(), _vision().state_dict().values())
    )


def test_bfloat16() -> None:
    vision = _vision().to(torch.bfloat16)
    vproj = VisionProjector(4 * H, LLM).to(torch.bfloat16)
    enc, proj = _audio()
    enc, proj = enc.to(torch.bfloat16), proj.to(torch.bfloat16)
    assert "embeddings._pe" not in enc.state_dict()
    with torch.no_grad():
        img = encode_images(vision, vproj, torch.randn(2, 3, IMAGE, IMAGE))  # float32 pixels are cast
        aud = encode_audio(enc, proj, torch.randn(148, 80))
    assert img.dtype == aud.dtype == torch.bfloat16
    assert img.shape == (2, 4, LLM) and aud.shape == (18, LLM)
    assert torch.isfinite(img.float()).all() and torch.isfinite(aud.float()).all()
    # bf16 tracks fp32 loosely.
    enc32, proj32 = _audio()
    feats = torch.randn(148, 80)
    with torch.no_grad():
        ref = encode_audio(enc32, proj32, feats)
        got = encode_audio(enc, proj, feats).float()
    assert F.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99


def test_position_table_survives_inference_mode_then_autograd() -> None:
    enc, proj = _audio()
    feats = torch.randn(60, 80)
    with torch.inference_mode():
        encode_audio(enc, proj, feats)
    encode_audio(enc, proj, feats).sum().backward()  # the cached table must not be an inference tensor
    assert enc.encoder.layers[0].self_attn.linear_pos.weight.grad is not None


# ---------------------------------------------------------------------------------------------------- chunk mask


def _upstream_subsequent_chunk_mask(size: int, ck_size: int, num_l_cks: int = -1) -> list[list[bool]]:
    """Transcription of upstream whale/utils.py `subsequent_chunk_mask`, with plain lists."""
    ret = [[False] * size for _ in range(size)]
    for i in range(size):
        if num_l_cks < 0:
            start = 0
        else:
            start = max((i // ck_size - num_l_cks) * ck_size, 0)
        ending = min((i // ck_size + 1) * ck_size, size)
        for j in range(start, ending):
            ret[i][j] = True
    return ret


def _whale(chunk_size: int = -1, left_chunks: int = -1) -> WhaleAudioEncoder:
    torch.manual_seed(1)  # the same weights as `_audio()`'s encoder
    enc = WhaleAudioEncoder(
        input_dim=80,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=I,
        chunk_size=chunk_size,
        left_chunks=left_chunks,
    )
    return enc.eval()


@pytest.mark.parametrize("size", [1, 2, 7, 16, 37])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16, 50])
@pytest.mark.parametrize("left_chunks", [-1, 0, 1, 2, 5])
def test_chunk_mask_matches_upstream(size: int, chunk_size: int, left_chunks: int) -> None:
    mask = chunk_attention_mask(size, chunk_size, left_chunks)
    assert mask.dtype == torch.bool
    assert mask.tolist() == _upstream_subsequent_chunk_mask(size, chunk_size, left_chunks)


def test_chunk_mask_hand_example() -> None:
    # 7 frames, chunks of 3 -> chunks {0,1,2} {3,4,5} {6}; one left chunk.
    expected = [
        "1110000",
        "1110000",
        "1110000",
        "1111110",
        "1111110",
        "1111110",
        "0001111",
    ]
    got = ["".join("1" if v else "0" for v in row) for row in chunk_attention_mask(7, 3, 1).tolist()]
    assert got == expected
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_attention_mask(7, 0)


@pytest.mark.parametrize(("chunk_size", "left_chunks"), [(3, -1), (2, 0), (4, 1)])
def test_encoder_mask_is_upstreams_on_valid_rows(chunk_size: int, left_chunks: int) -> None:
    """Upstream: (B, 1, T) padding mask sliced [2::2][2::2], ANDed with the chunk mask of the subsampled length."""
    enc = _whale(chunk_size, left_chunks)
    frames = 61
    lengths = torch.tensor([61, 40, 23])
    t = subsampled_lengths(frames)
    sub = subsampled_lengths(lengths)
    mask = enc.attention_mask(sub, t)
    assert mask is not None and mask.shape == (3, t, t)
    padding = (torch.arange(frames)[None, :] < lengths[:, None]).unsqueeze(1)[:, :, 2::2][:, :, 2::2]
    upstream = padding & torch.tensor(_upstream_subsequent_chunk_mask(t, chunk_size, left_chunks))[None]
    for b in range(3):
        n = int(sub[b])
        assert torch.equal(mask[b, :n], upstream[b, :n])
        assert mask[b].any(-1).all()  # padded rows too see at least one key: no all -inf row, no NaN
        assert not mask[b, :, n:].any()  # nobody attends to padding
    # Unbatched: the chunk mask alone.
    alone = enc.attention_mask(torch.tensor([t]), t)
    assert alone is not None and torch.equal(alone[0], chunk_attention_mask(t, chunk_size, left_chunks))


def test_full_attention_masks_unchanged() -> None:
    """chunk_size = -1: no mask unbatched (SDPA's fast path), a (B, T') key mask when padded."""
    enc = _whale()
    assert enc.attention_mask(torch.tensor([20, 20]), 20) is None
    key_mask = enc.attention_mask(torch.tensor([20, 11]), 20)
    assert key_mask is not None and key_mask.shape == (2, 20)
    assert key_mask.sum(-1).tolist() == [20, 11]


@pytest.mark.parametrize(("chunk_size", "left_chunks"), [(-1, -1), (4, -1), (3, 0), (5, 2), (1, 1)])
def test_tower_matches_reference(chunk_size: int, left_chunks: int) -> None:
    enc = _whale(chunk_size, left_chunks)
    torch.manual_seed(7)
    frame_lengths = [148, 97, 60, 151]
    batch = torch.full((len(frame_lengths), max(frame_lengths), 80), 7.0)  # garbage padding
    for i, n in enumerate(frame_lengths):
        batch[i, :n] = torch.randn(n, 80)
    lengths = torch.tensor(frame_lengths)
    with torch.no_grad():
        hidden, out_lengths = enc(batch, lengths)
        ref, ref_lengths = whale_encoder_reference(enc, batch, lengths, chunk_size, left_chunks)
        assert torch.isfinite(hidden).all()
        assert out_lengths.tolist() == ref_lengths.tolist()
        for i, n in enumerate(out_lengths.tolist()):
            torch.testing.assert_close(hidden[i, :n], ref[i, :n], rtol=1e-5, atol=1e-5)
            # Unbatched: the padded batch changes nothing.
            alone, _ = enc(batch[i : i + 1, : frame_lengths[i]])
            torch.testing.assert_close(hidden[i, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_full_attention_tower_is_unchanged(audio: tuple[WhaleAudioEncoder, AudioProjector]) -> None:
    """The default tower (chunk_size -1) is the one every other test checks; chunking really changes it."""
    enc, _ = audio
    assert (enc.chunk_size, enc.left_chunks) == (-1, -1)
    feats = torch.randn(1, 148, 80)
    with torch.no_grad():
        full = enc(feats)[0]
        torch.testing.assert_close(_whale()(feats)[0], full, rtol=0, atol=0)
        torch.testing.assert_close(whale_encoder_reference(enc, feats)[0], full, rtol=1e-5, atol=1e-5)
        chunked = _whale(4, 1)(feats)[0]
    assert not torch.allclose(chunked, full, atol=1e-3)


def test_chunks_do_not_see_the_future() -> None:
    """With chunks (any left context), outputs of chunks before k ignore input frames that only feed chunk k on.

    Subsampled frame t reads fbank frames 4t..4t+6, so the last frame of chunk k-1 (t = ck - 1) reads up to
    frame 4ck + 2; changing frames from 4ck + 3 on must leave chunks 0..k-1 as they were.
    """
    c, k = 4, 3
    feats = torch.randn(1, 200, 80)
    later = feats.clone()
    later[:, 4 * c * k + 3 :] += torch.randn_like(later[:, 4 * c * k + 3 :])
    for enc, isolated in ((_whale(c, -1), True), (_whale(c, 0), True), (_whale(), False)):
        with torch.no_grad():
            a, b = enc(feats)[0], enc(later)[0]
        assert torch.equal(a[0, : c * k], b[0, : c * k]) is isolated
        assert not torch.allclose(a[0, c * k :], b[0, c * k :])


def test_chunk_settings_reach_the_tower_from_the_config() -> None:
    audio = {"hidden_size": H, "intermediate_size": I, "num_hidden_layers": 1, "num_attention_heads": HEADS}
    default, _ = make_audio_tower(VitaConfig(audio_config=audio))
    assert (default.chunk_size, default.left_chunks) == (-1, -1)
    chunked, _ = make_audio_tower(VitaConfig(audio_config={**audio, "chunk_size": 8, "left_chunks": 2}))
    assert (chunked.chunk_size, chunked.left_chunks) == (8, 2)


def test_bfloat16_chunked_padded_batch_is_finite() -> None:
    enc = _whale(2, 0).to(torch.bfloat16)  # left 0: padded rows past the last chunk see no valid key upstream
    batch = torch.randn(2, 100, 80)
    with torch.no_grad():
        hidden, lengths = enc(batch, torch.tensor([100, 30]))
    assert torch.isfinite(hidden.float()).all()
    assert lengths.tolist() == [24, 6]
