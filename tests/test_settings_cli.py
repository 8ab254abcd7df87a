"""`vita-duplex serve` flags come from the settings fields (pydantic-settings' CLI source), with CLI > env > file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from server.settings import ServerSettings, add_cli_arguments, load_settings


def _parse(argv: list[str], config_file: Path | None = None) -> ServerSettings:
    parser = argparse.ArgumentParser()
    source = add_cli_arguments(parser)
    return load_settings(source(parsed_args=parser.parse_args(argv))(), config_file)


def test_every_setting_is_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in flags, name


def test_flags_parse_to_typed_settings() -> None:
    settings = _parse(["--model", "/a", "--model", "/b", "--api-key", "k1", "--kv-cache-mib", "64",
                       "--gpu-ids", "0,1", "--no-echo-guard", "--max-model-len", "null", "--tts", "none",
                       "--vad-threshold", "0.3"])
    assert settings.models == ["/a", "/b"]
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1"]
    assert settings.kv_cache_mib == 64 and settings.gpu_ids == ["0", "1"]
    assert settings.echo_guard is False and settings.max_model_len is None
    assert settings.vad_threshold == pytest.approx(0.3)


def test_cli_beats_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "vita.toml"
    config.write_text("kv_cache_mib = 32\nmax_tokens = 7\nport = 9001\n")
    monkeypatch.setenv("VITA_KV_CACHE_MIB", "128")
    monkeypatch.setenv("VITA_MAX_TOKENS", "9")
    settings = _parse(["--kv-cache-mib", "64"], config)
    assert (settings.kv_cache_mib, settings.max_tokens, settings.port) == (64, 9, 9001)


def test_bad_flag_values_are_refused() -> None:
    with pytest.raises(ValueError, match="device"):
        _parse(["--device", "tpu"])
    with pytest.raises(ValueError, match="engines"):
        _parse(["--engines", "3"])
