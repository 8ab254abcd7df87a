"""One settings model for the server: CLI flags > `VITA_*` environment variables > config file > defaults."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

# Lists come from env vars as JSON or comma-separated: decoded by the validators below, not by pydantic-settings.
StrList = Annotated[list[str], NoDecode]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITA_", extra="forbid")

    # Models and engines
    models: StrList = Field(default_factory=list, description="checkpoint dir(s); none: the embedded demo")
    engines: int = Field(2, ge=1, le=2, description="2: generator + monitor engines; 1: both roles on one")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu_ids: StrList = Field(default_factory=list, description='per engine CUDA_VISIBLE_DEVICES, e.g. ["0","1"]')
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="per GPU; split when engines share one")
    tensor_parallel_size: int = Field(1, ge=1)
    dtype: str = "auto"
    kv_cache_mib: int = Field(256, ge=16, description="KV-cache cap per engine on CPU")
    cpu_cores: StrList = Field(default_factory=list, description='per engine cores on CPU, e.g. ["0","1"]')
    max_model_len: int | None = None
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)

    # Network, auth and limits
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="if set, every request needs one")
    allowed_origins: StrList = Field(default_factory=list, description="browser origins; empty: any")
    max_sessions: int = Field(16, ge=1)
    max_event_bytes: int = Field(15 << 20, ge=1024)
    max_buffered_audio_s: float = Field(60.0, gt=0)
    max_send_buffer_bytes: int = Field(16 << 20, ge=4096, description="per session; a client further behind is closed")
    idle_timeout_s: float = Field(600.0, gt=0)
    media_url_allowlist: StrList = Field(default_factory=list, description="hosts http(s) media may come from")

    # Conversation and VAD defaults (clients may change them per session)
    history_turns: int = Field(2, ge=0)
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    vad_prefix_padding_ms: int = Field(300, ge=0)
    vad_silence_duration_ms: int = Field(500, ge=0)
    vad_min_speech_ms: int = Field(250, ge=0)
    no_state_token_policy: Literal["answer", "ignore"] = "answer"
    echo_guard: bool = Field(True, description="ignore our own voice coming back through the microphone")
    vita_events: bool = Field(True, description="send the vita.* realtime events unless a client connects with "
                              "?vita_events=0 (strict GA clients, e.g. the OpenAI Agents SDK, report them as errors)")

    # Speech out
    tts: Literal["espeak", "http", "none"] = "espeak"
    tts_url: str | None = Field(None, description="OpenAI-compatible /v1/audio/speech base URL (tts=http)")
    tts_model: str = "tts-1"
    tts_voice: str = "alloy"

    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    @field_validator("models", "gpu_ids", "cpu_cores", "allowed_origins", "media_url_allowlist", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # VITA_MODELS=/a,/b as well as JSON lists
        if isinstance(value, str) and value.strip().startswith("["):
            return json.loads(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _comma_keys(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().startswith("["):
            value = json.loads(value)
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        def blank(key: Any) -> bool:
            return not (key.get_secret_value() if isinstance(key, SecretStr) else str(key)).strip()

        if isinstance(value, list) and any(blank(v) for v in value):
            raise ValueError("api_keys must not contain empty keys (an unset variable?)")
        return value


class _FileSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML or JSON file of settings (same names as the fields)."""
    text = path.read_text()
    if path.suffix == ".json":
        return dict(json.loads(text))
    return dict(tomllib.loads(text))


def load_settings(cli: dict[str, Any] | None = None, config_file: Path | None = None) -> ServerSettings:
    file_values = read_config_file(config_file) if config_file else {}

    class _Settings(ServerSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _FileSource(settings_cls, file_values))

    values = {k: v for k, v in (cli or {}).items() if v is not None}
    return ServerSettings.model_validate(_Settings(**values).model_dump())
