"""server/wire/ without a server: what it may import, the typed server events and their ids, the one
base64 / data-URL decoder, and the error-code enum against the controller's codes."""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.realtime import (
    ConversationItemAdded,
    RealtimeServerEvent,
    ResponseTextDeltaEvent,
    SessionUpdatedEvent,
)

from server.wire import inline_data
from server.wire.audio_codec import AudioFormat, AudioFormatError, decode, encode
from server.wire.errors import ErrorCode, realtime_error
from server.wire.inline_data import InlineDataError, decode_base64, decode_inline, parse_data_url
from server.wire.items import assistant_message, user_message
from server.wire.server_events import ServerEventEncoder, strict

ROOT = Path(__file__).resolve().parents[1]
SERVER_EVENTS = pydantic.TypeAdapter(RealtimeServerEvent)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


# --- what the layers import --------------------------------------------------------------------------


def test_the_wire_package_imports_nothing_of_server_duplex_or_models() -> None:
    for path in sorted((ROOT / "server/wire").glob("*.py")):
        ours = {n for n in _imports(path) if n.split(".")[0] in ("server", "duplex", "models", "clients")}
        assert not ours, f"{path.relative_to(ROOT)} imports {sorted(ours)}: the wire imports only its own modules"


def test_the_python_client_imports_only_the_wire_of_the_server() -> None:
    for path in sorted((ROOT / "clients/python").glob("*.py")):
        server = {n for n in _imports(path) if n == "server" or n.startswith("server.")}
        assert all(n.startswith("server.wire") for n in server), f"{path.relative_to(ROOT)} imports {sorted(server)}"


# --- typed server events -----------------------------------------------------------------------------


def test_every_event_gets_a_unique_event_id_across_connections() -> None:
    ids = set()
    for _ in range(3):
        events = ServerEventEncoder()
        for _ in range(100):
            ids.add(events.new(ResponseTextDeltaEvent, type="response.output_text.delta", response_id="r",
                               item_id="i", output_index=0, content_index=0, delta="x").event_id)
    assert len(ids) == 300


def test_a_field_the_model_does_not_declare_is_refused_at_any_depth() -> None:
    events = ServerEventEncoder()
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        events.new(ResponseTextDeltaEvent, type="response.output_text.delta", response_id="r", item_id="i",
                   output_index=0, content_index=0, delta="x", text="typo")
    with pytest.raises(pydantic.ValidationError, match="content.0.txt"):
        events.new(ConversationItemAdded, type="conversation.item.added", item={
            "type": "message", "role": "assistant", "content": [{"type": "output_text", "txt": "typo"}]})


def test_beta_part_types_in_an_assistant_item_are_refused() -> None:
    with pytest.raises(pydantic.ValidationError):
        strict(ConversationItemAdded, event_id="e", type="conversation.item.added", item={
            "type": "message", "role": "assistant", "content": [{"type": "text", "text": "beta"}]})


def test_items_use_the_ga_part_types_and_validate_strictly() -> None:
    events = ServerEventEncoder()
    for item in (assistant_message("i1", audio=True, text="hi", status="completed"),
                 assistant_message("i2", audio=False, text="hi", status="incomplete"),
                 user_message("i3", [{"type": "input_text", "text": "q"}, {"type": "input_audio", "transcript": None},
                                     {"type": "input_image"}])):
        text = events.encode(events.new(ConversationItemAdded, type="conversation.item.added", item=item))
        SERVER_EVENTS.validate_json(text, strict=True, extra="forbid")
        parts = [p["type"] for p in json.loads(text)["item"]["content"]]
        assert set(parts) <= {"output_audio", "output_text", "input_text", "input_audio", "input_image"}, parts


def test_encode_sends_exactly_the_fields_set() -> None:
    events = ServerEventEncoder()
    event = events.new(ConversationItemAdded, type="conversation.item.added", previous_item_id=None,
                       item=assistant_message("i", audio=False, text=None, status="in_progress"))
    data = json.loads(events.encode(event))
    assert data["previous_item_id"] is None and "audio" not in data["item"]  # given None: null; not given: absent


def test_a_lone_surrogate_is_escaped_rather_than_lost() -> None:
    events = ServerEventEncoder()
    event = events.new(ResponseTextDeltaEvent, type="response.output_text.delta", response_id="r", item_id="i",
                       output_index=0, content_index=0, delta="a\ud800b")
    assert json.loads(events.encode(event))["delta"] == "a\ud800b"


def test_session_objects_are_ga_except_the_16k_extension() -> None:
    from server.realtime_config import RealtimeConfig
    from server.settings import ServerSettings
    from server.wire.client_events import TurnDetection

    defaults = TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500, create_response=True,
                             interrupt_response=True)
    config = RealtimeConfig(model="vita", max_output_tokens=48, output_modalities=["audio"], vad_defaults=defaults,
                            turn_detection=defaults)
    events = ServerEventEncoder()

    def session() -> dict:
        text = events.encode(events.new(SessionUpdatedEvent, type="session.updated", session=config.ga_session()))
        return json.loads(text)

    SERVER_EVENTS.validate_python(session(), strict=True, extra="forbid")
    config.update_turn_detection(TurnDetection(type="semantic_vad", eagerness="high"))
    detection = session()["session"]["audio"]["input"]["turn_detection"]
    assert detection == {"type": "semantic_vad", "eagerness": "high", "create_response": True,
                         "interrupt_response": True}
    assert config.vad_params(ServerSettings()).silence_duration_ms == ServerSettings().vad_silence_duration_ms / 2
    SERVER_EVENTS.validate_python(session(), strict=True, extra="forbid")
    config.turn_detection = None
    assert session()["session"]["audio"]["input"]["turn_detection"] is None
    config.input_format = AudioFormat("pcm16", 16000)  # ours: GA's audio/pcm is 24 kHz only
    assert session()["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}


# --- error codes -------------------------------------------------------------------------------------


def test_the_controllers_error_codes_are_in_the_enum() -> None:
    """The duplex layer cannot import the wire; its codes are string literals, checked here."""
    codes = set()
    for path in sorted((ROOT / "duplex").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Error"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                codes.add(node.args[0].value)
    assert codes, "no Error(...) calls found: has the controller's error action been renamed?"
    assert codes <= {c.value for c in ErrorCode}, codes - {c.value for c in ErrorCode}


def test_server_faults_are_typed_as_such() -> None:
    assert realtime_error("engine_error", "x").type == "server_error"
    assert realtime_error(ErrorCode.INVALID_AUDIO, "x").type == "invalid_request_error"
    assert realtime_error("some_new_code", "x").code == "some_new_code"


# --- base64 and data URLs ----------------------------------------------------------------------------

RAW = bytes(range(250, 256)) + b"\xfb\xff"
STD = base64.b64encode(RAW).decode()


@pytest.mark.parametrize("text", [
    STD, STD[:4] + "\n " + STD[4:], STD.rstrip("="), base64.urlsafe_b64encode(RAW).decode().rstrip("="),
    "\n".join(STD[i : i + 4] for i in range(0, len(STD), 4)),
])
def test_base64_variants_that_decode(text: str) -> None:
    assert decode_base64(text, "x") == RAW


@pytest.mark.parametrize("text", ["not base64!!", "abc$", STD + "!", "+/-_", "A"])
def test_base64_that_is_refused_names_the_field(text: str) -> None:
    with pytest.raises(InlineDataError, match="^audio "):
        decode_base64(text, "audio")


def _decoded(text: str) -> bytes | str:
    try:
        return decode_base64(text, "audio", allow_empty=True)
    except InlineDataError as exc:
        return f"refused: {exc}"


_B64_TEXT = st.text(alphabet="ABCDQRwxyz0189+/-_= \n\t%\u00e9", max_size=24) | st.binary(max_size=18).map(
    lambda b: base64.b64encode(b).decode())


@settings(max_examples=2000, deadline=None)
@given(text=_B64_TEXT)
def test_the_simd_base64_decoder_changes_no_answer(text: str) -> None:
    """pybase64 (issue 14) takes what it accepts; the rest goes the way it always went: every text gets the bytes
    or the refusal it got from binascii's strict mode and the lenient decoder alone."""
    def refuse_all(*_args: object, **_kwargs: object) -> bytes:
        raise ValueError("the SIMD decoder turned off")

    fast = _decoded(text)
    saved, inline_data._simd_b64decode = inline_data._simd_b64decode, refuse_all
    try:
        assert fast == _decoded(text)
    finally:
        inline_data._simd_b64decode = saved


def test_empty_base64_only_where_allowed() -> None:
    assert decode_base64("", "audio", allow_empty=True) == b""
    with pytest.raises(InlineDataError, match="empty"):
        decode_base64("", "image")
    with pytest.raises(InlineDataError, match="base64 string"):
        decode_base64(None, "audio")


def test_data_urls_and_bare_base64() -> None:
    assert parse_data_url("data:image/PNG;base64," + STD) .mime == "image/png"
    assert parse_data_url("data:text/plain;charset=utf-8,hello%20world").data == b"hello world"
    assert decode_inline(STD, "image").data == RAW and decode_inline(STD, "image").mime == ""
    with pytest.raises(InlineDataError, match="no ','"):
        parse_data_url("data:image/png;base64")


# --- audio codecs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [AudioFormat("pcm16", 24000), AudioFormat("pcmu", 8000), AudioFormat("pcma", 8000)])
def test_codecs_round_trip(fmt: AudioFormat) -> None:
    import numpy as np

    x = (0.5 * np.sin(np.arange(800) / 7)).astype(np.float32)
    assert np.max(np.abs(decode(encode(x, fmt), fmt) - x)) < (2e-4 if fmt.encoding == "pcm16" else 0.02)


def test_pcm16_decodes_every_value_exactly() -> None:
    import numpy as np

    values = np.arange(-32768, 32768, dtype="<i2")
    for raw in (values.tobytes(), b""):
        got = decode(raw, AudioFormat("pcm16", 16000))
        want = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        assert got.dtype == np.float32 and got.shape == want.shape
        assert got.tobytes() == want.tobytes()  # bit for bit


@pytest.mark.parametrize("encoding", ["pcmu", "pcma"])
def test_g711_is_the_itu_table(encoding: str) -> None:
    """Known G.711 code points, and every code survives decode → encode unchanged (μ-law's two zeros aside)."""
    import numpy as np

    fmt = AudioFormat(encoding, 8000)  # type: ignore[arg-type]
    known = {"pcmu": {0xFF: 0, 0x80: 32124, 0x00: -32124, 0x7F: 0},
             "pcma": {0xD5: 8, 0x55: -8, 0xAA: 32256, 0x2A: -32256}}[encoding]
    for code, value in known.items():
        assert decode(bytes([code]), fmt)[0] * 32768.0 == value, hex(code)
    codes = bytes(range(256))
    again = encode(decode(codes, fmt) * (32768.0 / 32767.0), fmt)
    differing = [c for c, d in zip(codes, again, strict=True) if c != d]
    assert differing in ([], [0x7F]), differing  # μ-law 0x7F is the negative zero; it encodes as 0xFF
    with pytest.raises(AudioFormatError):
        decode(b"\x00", AudioFormat("pcm16", 24000))
    assert np.all(np.abs(decode(encode(np.array([1.5, -1.5], np.float32), fmt), fmt)) > 0.9)  # clipped, not wrapped
