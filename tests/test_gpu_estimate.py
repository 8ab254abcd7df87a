"""bench/gpu_estimate.py: the CPU smoke run (--tiny) prints every stage with sane numbers, the prompt
really went through the LM, it runs on a bare torch + transformers box, and full size is VITA-1.5's."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.audio_features import audio_tokens_for_samples
from models.config import published_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_estimate.py"
ARGS = ["--device", "cpu", "--tiny", "--repeats", "2", "--warmup", "1"]

STAGES = [
    "audio encode (whale + adapter)",
    "vision encode, 4 frames (ViT + projector)",
    "vision encode, 1 frame",
    "prefill, full prompt -> 1st token",
    "prefill, sys+history cached -> 1st token",
    "decode step (per token)",
    "decode 8 tokens (total)",
    "= speech end -> 1st token, vision ahead",
    "= speech end -> 1st token, vision at end",
    "= speech end -> 1st token, vision ahead, prefix cached",
    "= speech end -> 2nd token (1st word), vision ahead",
]
FBANK = "audio features, CPU fbank (3 s)"
VOICE = [  # the vita voice (speech decoder + TiCodec), after the VITA stages
    "voice: NAR + AR prompt pass, 1 sentence",
    "voice: AR step (per codec token)",
    "voice: TiCodec, first window (30 tok)",
    "= voice: sentence -> first audio",
]

# A machine with torch + transformers only: the optional audio stack and vLLM cannot be imported, and
# models.config stands in for a transformers release it does not support.
BARE = (
    "import runpy, sys\n"
    "for name in ('kaldi_native_fbank', 'soundfile', 'soxr', 'vllm', 'onnxruntime', 'models.config'):\n"
    "    sys.modules[name] = None\n"
    f"sys.argv = [{str(SCRIPT)!r}] + {ARGS!r}\n"
    "try:\n"
    f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    "finally:\n"
    "    leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'onnxruntime', 'kaldi_native_fbank')"
    " and sys.modules[m] is not None)\n"
    "    print('# leaked imports:', leaked)\n"
)


def _expected_prompt_tokens() -> int:
    config = published_config("vita15")
    audio = audio_tokens_for_samples(3 * 16000)  # 3 s of 16 kHz speech: 298 fbank frames -> 37 tokens
    assert audio == 37
    # system 100 + history 300 + "<|im_start|>user\n" (3) + frames + "\n" (1) + audio + "<|im_end|>\n<|im_start|>assistant\n" (5)
    return 100 + 300 + 3 + 4 * config.tokens_per_tile + 1 + audio + 5


@pytest.fixture(scope="module")
def outputs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Both runs at once (one per core): the repo's environment, and the bare-box simulation."""
    procs = {
        "full": subprocess.Popen(
            [sys.executable, str(SCRIPT), *ARGS],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ),
        "bare": subprocess.Popen(
            [sys.executable, "-c", BARE], cwd="/", text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ),
    }
    done = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def _rows(stdout: str) -> dict[str, tuple[str, float, float]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 4 and cells[0] != "stage":
            rows[cells[0]] = (cells[1], float(cells[2]), float(cells[3]))
    return rows


def _header(stdout: str, prefix: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, stdout)
    return lines[0]


@pytest.mark.parametrize("kind", ["full", "bare"])
def test_every_stage_is_timed(outputs: dict[str, subprocess.CompletedProcess[str]], kind: str) -> None:
    result = outputs[kind]
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    expected = STAGES + VOICE + ([FBANK] if kind == "full" else [])
    assert sorted(rows) == sorted(expected), result.stdout
    for name, (_, p50, low) in rows.items():
        assert math.isfinite(p50) and math.isfinite(low) and 0 < low <= p50, (name, p50, low)
    # Derived rows are the sums they claim to be (p50 column).
    assert rows[STAGES[7]][1] == pytest.approx(rows[STAGES[0]][1] + rows[STAGES[3]][1], abs=0.02)
    assert rows[STAGES[8]][1] == pytest.approx(
        rows[STAGES[0]][1] + rows[STAGES[1]][1] + rows[STAGES[3]][1], abs=0.03
    )
    assert rows[STAGES[9]][1] == pytest.approx(rows[STAGES[0]][1] + rows[STAGES[4]][1], abs=0.02)
    # first audio = the prompt pass + 30 AR steps (the first window: 20 kept + 10 padding tokens) + TiCodec
    # the row sums unrounded values; each printed value is rounded to 0.01, and the AR step counts 30 times
    assert rows[VOICE[3]][1] == pytest.approx(rows[VOICE[0]][1] + 30 * rows[VOICE[1]][1] + rows[VOICE[2]][1], abs=0.2)
    assert rows[VOICE[2]][0] == f"{30 * 600} samples"  # TiCodec really decoded the window: 600 per token


@pytest.mark.parametrize("kind", ["full", "bare"])
def test_prompt_went_through_the_lm(outputs: dict[str, subprocess.CompletedProcess[str]], kind: str) -> None:
    stdout = outputs[kind].stdout
    total = _expected_prompt_tokens()
    rows = _rows(stdout)
    assert rows["prefill, full prompt -> 1st token"][0] == f"{total} tok"
    assert rows["prefill, sys+history cached -> 1st token"][0] == f"{total - 400} on 400 cached"
    assert rows["audio encode (whale + adapter)"][0] == "298 fr -> 37 tok"
    # The KV cache lengths are read back from the LM's cache, not computed.
    assert f"KV after prefill {total}, after decode {total + 8}" in _header(stdout, "# prompt:")


def test_bare_box_uses_stand_ins(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    full, bare = outputs["full"].stdout, outputs["bare"].stdout
    assert "real Kaldi fbank" in _header(full, "# audio:")
    assert "random (T, 80) fbank stand-in" in _header(bare, "# audio:")
    assert _header(bare, "# leaked imports:") == "# leaked imports: []"


def test_missing_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr and "--device cpu" in result.stderr


def _module():
    spec = importlib.util.spec_from_file_location("gpu_estimate", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_estimate"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sizes_fall_back_to_the_built_in_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where models.config cannot import (transformers 4.x has no PreTrainedConfig), the copy is used."""
    g = _module()
    monkeypatch.setitem(sys.modules, "models.config", None)
    sizes = g.full_sizes()
    assert sizes.source.startswith("built-in copy (models.config not importable: ModuleNotFoundError")
    assert sizes == g.replace(g.Sizes(), source=sizes.source)


def test_full_size_is_vita15() -> None:
    """Built on the meta device (nothing allocated): the counts of research/vita_weights.md."""
    g = _module()
    sizes = g.full_sizes()
    assert sizes.source == 'models.config.published_config("vita15")'
    assert g.replace(sizes, source="") == g.replace(g.Sizes(), source="")  # the built-in copy agrees
    assert sizes.tokens_per_frame == 256
    parts = g.build(sizes, "meta", torch.bfloat16)
    assert next(parts.lm.parameters()).dtype == torch.bfloat16
    assert parts.lm.config._attn_implementation == "sdpa"
    assert parts.param_counts() == {
        "vision tower (InternViT)": 304_012_288,
        "vision projector (mlp2x_gelu)": 27_532_288,
        "audio encoder (whale)": 357_950_464,  # 357,950,624 less the 160 CMVN buffer elements
        "audio adapter": 17_835_520,
        "LM (Qwen2, incl. embed + lm_head)": 7_615_616_512,
    }


def test_voice_at_real_size() -> None:
    """The vita voice's stated sizes: Freeze-Omni's decoder/codec (VITA-1.5's design), built on the meta device."""
    g = _module()
    voice = g.build_voice(False, torch.device("meta"), torch.bfloat16)
    assert voice.param_counts() == {"speech decoder (NAR + AR + head)": 99_569_028,
                                    "TiCodec decoder side": 16_025_217}
    cfg = voice.decoder.cfg
    assert (cfg.idim * 4, cfg.hidden_size, cfg.num_layers, cfg.num_pre_nn_layers, cfg.head_dim) == (3584, 896, 4, 2, 64)
    assert voice.codec.cfg.samples_per_token == 600 and voice.kv_bytes_per_token(torch.bfloat16) == 14_336


def test_voice_only_runs_alone() -> None:
    """`--voice-only`: just the voice's rows (how the README's real-size CPU numbers were taken)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--voice-only", "--repeats", "1", "--warmup", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(_rows(result.stdout)) == sorted(VOICE), result.stdout
    assert "# voice: KV cache 1.0 KiB per codec token in float32" in result.stdout
