"""The vita voice outside the server: `vita-duplex inspect` reports it, `vita-duplex generate --speech-out` speaks
with it, and a hub id fetches it (its two `final.pt` pickles by exact name, nothing else that is a pickle)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from models.vita_tts.config import CODEC_DIR, DECODER_DIR, WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _inspect(spec: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from clients.cli import main

    code = main(["inspect", spec])
    return code, capsys.readouterr().out


# --- inspect -----------------------------------------------------------------------------------------------


def test_inspect_reports_the_voice_its_tensors_and_sizes(
    tiny_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _inspect(str(tiny_dirs["vita15"]), capsys)
    assert code == 0, out
    assert f"speech decoder: {tiny_dirs['vita15'] / 'vita_tts_ckpt'}" in out
    assert "  decoder: width 64, 2 AR + 1 NAR layers, 2 heads, FFN 128, 64 codes + 4 specials" in out
    assert "  codec: TiCodec, 600 samples per token at 24000 Hz, 64 codes" in out
    for name, count in (("decoder/final.pt", 31), ("codec/final.pt", 63)):
        assert f"  {name}: " in out and f"loaded as plain tensors; {count} of {count} tensors" in out, out
    assert out.rstrip().endswith("OK: 0 problem(s), 0 warning(s)")

    code, out = _inspect(str(tiny_dirs["vita10"]), capsys)  # VITA-1.0 publishes no voice
    assert code == 0 and "speech decoder: none (no vita_tts_ckpt/)" in out


def test_inspect_fails_a_voice_that_would_fail_to_serve(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Path(shutil.copytree(tiny_dirs["vita15"], tmp_path / "model"))
    decoder = model / "vita_tts_ckpt" / DECODER_DIR / WEIGHTS_FILE
    weights = torch.load(decoder, weights_only=True)
    del weights["layers.1.mlp.down_proj.weight"]
    torch.save(weights, decoder)
    code, out = _inspect(str(model), capsys)
    assert code == 1
    assert "problem: speech decoder decoder/final.pt: 1 tensors missing, 0 of the wrong shape " \
           "(first: layers.1.mlp.down_proj.weight)" in out
    assert "30 of 31 tensors" in out

    # a pickle that needs more than tensors to load is refused, never unpickled
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-3)}, decoder)
    code, out = _inspect(str(model), capsys)
    assert code == 1 and "unusable" in out and "refusing to load" in out, out


# --- generate --speech-out ------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_generate_speaks_the_reply_with_the_checkpoints_voice(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The whole command (a real vLLM engine), then the reply spoken by the checkpoint's own voice."""
    out = tmp_path / "reply.wav"
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "generate", "--model", str(tiny_dirs["vita15"]), "--text",
         "Hello, who are you?", "--max-tokens", "8", "--kv-cache-mib", "64", "--dtype", "float32",
         "--speech-out", str(out), "--speech-max-tokens", "45"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("[speech] "))
    assert "the checkpoint's own voice (vita_tts_ckpt/)" in line and str(out) in line
    sentences = int(line.split()[1])
    with wave.open(str(out), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    # each sentence: at most 45 codec tokens of 600 samples; the first one at least its first window's 20
    assert sentences >= 1 and 0 < pcm.size <= sentences * 45 * 600, (sentences, pcm.size)
    assert np.abs(pcm).max() > 100


def test_speech_out_falls_back_to_espeak_without_the_voice(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint without vita_tts_ckpt/ (VITA-1.0 here) is spoken by espeak, and the command says so."""
    from clients.cli import _reply_voice, _speak_reply

    voice = _reply_voice(str(tiny_dirs["vita10"]))
    assert voice == ("espeak", tiny_dirs["vita10"])
    assert _reply_voice(str(tiny_dirs["vita15"])) == ("vita", tiny_dirs["vita15"])
    out = tmp_path / "reply.wav"
    args = argparse.Namespace(speech_out=out, speech_max_tokens=1000)
    assert _speak_reply("☞Hello there. How are you?<|im_end|>", voice, args, None) == 0
    assert "[speech] 2 sentence(s)" in capsys.readouterr().out
    with wave.open(str(out), "rb") as w:
        assert w.getframerate() == 22050 and w.getnframes() > 22050 // 2  # espeak's native rate, > 0.5 s


def test_speech_out_without_any_voice_is_a_clear_error(tiny_dirs: dict[str, Path]) -> None:
    """No vita_tts_ckpt/ and no espeak (the optional GPL extra): refused before any engine starts."""
    probe = (
        "import sys; sys.modules['espeakng_loader'] = None\n"
        "from clients.cli import _reply_voice\n"
        f"_reply_voice({str(tiny_dirs['vita10'])!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1
    assert "has no vita_tts_ckpt/ (its own voice), and espeak is not here either" in result.stderr
    assert "pip install 'vita-duplex[espeak]'" in result.stderr


# --- hub ids ------------------------------------------------------------------------------------------------


def test_hub_snapshots_fetch_the_voice_pickles_by_exact_name_only() -> None:
    """What `snapshot_download` keeps of a repo listing (huggingface_hub's own filter) with our patterns."""
    from huggingface_hub.utils import filter_repo_objects

    from models.checkpoint import snapshot_patterns

    repo = [
        "README.md", "VITA1.5_ckpt/config.json", "VITA1.5_ckpt/model-00001-of-00004.safetensors",
        "VITA1.5_ckpt/tokenizer.json", "VITA1.5_ckpt/training_args.bin", "VITA1.5_ckpt/optimizer.pt",
        "vita_tts_ckpt/decoder/model.json", "vita_tts_ckpt/decoder/final.pt",
        "vita_tts_ckpt/codec/model.json", "vita_tts_ckpt/codec/final.pt",
        "vita_tts_ckpt/decoder/checkpoint_5000.pt", "vita_tts_ckpt/final.pt", "audiollm/final.pt",
        "VITA1.5_ckpt/vita_tts_ckpt/codec/final.pt", "modeling_vita.py",
    ]
    pickles = {p for p in repo if p.endswith((".pt", ".bin"))}
    voice = {"vita_tts_ckpt/decoder/final.pt", "vita_tts_ckpt/codec/final.pt"}
    whole = set(filter_repo_objects(repo, allow_patterns=snapshot_patterns()))
    assert whole & pickles == voice | {"VITA1.5_ckpt/vita_tts_ckpt/codec/final.pt"}  # inside the folder too
    assert {"vita_tts_ckpt/decoder/model.json", "VITA1.5_ckpt/config.json"} <= whole
    assert "modeling_vita.py" not in whole  # no code
    # owner/name/VITA1.5_ckpt: that folder, and the voice in it or beside it
    folder = set(filter_repo_objects(repo, allow_patterns=snapshot_patterns("VITA1.5_ckpt")))
    assert folder & pickles == voice | {"VITA1.5_ckpt/vita_tts_ckpt/codec/final.pt"}
    assert "VITA1.5_ckpt/tokenizer.json" in folder and "README.md" not in folder


def test_a_hub_id_finds_the_voice_beside_its_checkpoint_folder(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Published as VITA-MLLM/VITA-1.5 is (`VITA1.5_ckpt/` and `vita_tts_ckpt/` side by side), from an offline HF
    cache: the voice is found, `inspect` reports it, and it synthesizes."""
    from huggingface_hub import constants

    from duplex.tts_vita import has_vita_voice
    from models.checkpoint import resolve_model_dir
    from models.vita_tts.config import find_tts_dir
    from models.vita_tts.offline import synthesize

    repo = "tiny-org/VITA-voiced"
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    shutil.copytree(tiny_dirs["vita15"], snapshot / "VITA1.5_ckpt", ignore=shutil.ignore_patterns("vita_tts_ckpt"))
    shutil.copytree(tiny_dirs["vita15"] / "vita_tts_ckpt", snapshot / "vita_tts_ckpt")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    model_dir = resolve_model_dir(repo)
    assert model_dir == snapshot / "VITA1.5_ckpt" and not (model_dir / "vita_tts_ckpt").exists()
    assert has_vita_voice(model_dir) and find_tts_dir(model_dir) == snapshot / "vita_tts_ckpt"
    code, out = _inspect(repo, capsys)
    assert code == 0 and f"speech decoder: {snapshot / 'vita_tts_ckpt'}" in out, out
    audio, rate = synthesize(model_dir, ["Hello."], max_tokens=30)
    assert rate == 24000 and 0 < audio.size <= 30 * 600
    assert (snapshot / "vita_tts_ckpt" / CODEC_DIR / WEIGHTS_FILE).is_file()
