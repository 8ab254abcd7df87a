"""`vita-duplex`: the one command, on the user's side of the layers, reaching down into each.

`serve` runs the server (`server/serve.py`); `generate`, `inspect` and `build-tiny` use the model layer
directly (no server); `talk`, `ask` and `smoke` are the Python client's (`clients/python`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["smoke"]:  # parses its own arguments (deploy/smoke.py)
        return _smoke(argv[1:])
    parser = argparse.ArgumentParser(prog="vita-duplex", description="Duplex real-time inference server for VITA")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("build-tiny", help="write a tiny random VITA checkpoint (real layout, no download)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--layout", choices=["vita15", "vita10"], default="vita15")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--force-first-token", choices=["query", "noise", "text"], default=None,
                      help="wire the weights so the first generated token is this state token (for tests)")
    tiny.add_argument("--format", dest="config_format", choices=["vita", "training", "port"], default="vita",
                      help="config format: ours, the model repos' training config (towers written beside it), "
                           "or VITA's own vLLM port")

    inspect = sub.add_parser("inspect", help="preflight a checkpoint (directory or hub id): format, sources, "
                                             "state tokens, tensors; no GPU, no engine")
    inspect.add_argument("model")
    inspect.add_argument("--strict", action="store_true", help="warnings fail too")

    gen = sub.add_parser("generate", help="stream one reply from a checkpoint for a text/image/audio/video prompt")
    gen.add_argument("--model", required=True, help="checkpoint directory or hub id")
    gen.add_argument("--text")
    gen.add_argument("--image", type=Path, action="append", default=[])
    gen.add_argument("--audio", type=Path, action="append", default=[])
    gen.add_argument("--video", type=Path)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--kv-cache-mib", type=int, default=256, help="KV cache cap on CPU (ignored on GPU)")
    gen.add_argument("--speech-out", type=Path, metavar="WAV",
                     help="also speak the reply into this WAV file: with the checkpoint's own voice when it ships "
                          "vita_tts_ckpt/ (VITA-1.5), else with espeak (the optional [espeak] extra)")
    gen.add_argument("--speech-max-tokens", type=int, default=1000,
                     help="vita voice: codec tokens per sentence at most (40 per second of speech; upstream 1000)")

    serve = sub.add_parser("serve", help="run the server (no --model: the embedded CPU demo model)",
                           description="Every setting is a flag (server/settings.py); VITA_* environment "
                                       "variables and --config fill in what is not given.")
    serve.add_argument("--config", type=Path, help="TOML or JSON settings file (same names as VITA_* vars)")
    from server.settings import add_cli_arguments

    serve_flags = add_cli_arguments(serve)
    sub.add_parser("smoke", add_help=False, help="check a running server after a rollout (smoke URL --help)")

    from clients.python.cli import add_subcommands  # talk, ask: the Python client's commands
    from models.inputs import video_file_frames  # the client imports only the wire layer: we plug this in

    add_subcommands(sub, video_frames=video_file_frames)
    args = parser.parse_args(argv)
    if getattr(args, "client_command", None) is not None:
        return args.client_command(args)
    if args.command == "serve":
        from server.serve import serve

        return serve(serve_flags(parsed_args=args)(), args.config)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build-tiny":
        from models.tiny import build_tiny

        path = build_tiny(args.layout, args.out_dir, seed=args.seed, force=args.force_first_token,
                          config_format=args.config_format)
        print(f"tiny {args.layout} checkpoint ({args.config_format} format) written to {path}")
        return 0
    if args.command == "inspect":
        from models.preflight import inspect_checkpoint

        report = inspect_checkpoint(args.model)
        print(report.render())
        return 1 if report.problems or (args.strict and report.warnings) else 0
    if args.command == "generate":
        return asyncio.run(_generate(args))
    return 2


def _smoke(argv: list[str]) -> int:
    """`vita-duplex smoke URL`: what an operator runs after a rollout (clients/python/smoke.py)."""
    from clients.python.smoke import main as smoke_main

    return smoke_main(argv, speaker=espeak_speaker)


def espeak_speaker(text: str) -> tuple[object, int]:
    """The server's espeak voice (the optional GPL extra) for the smoke check's spoken question."""
    from duplex.tts import EspeakTTS

    tts = EspeakTTS()
    return tts.synthesize_blocking(text), tts.sample_rate


async def _generate(args: argparse.Namespace) -> int:
    import torch

    from models.engine import EngineSettings, Sampling, VitaEngine
    from models.errors import InvalidMediaError
    from models.inputs import user_input, video_file_frames
    from models.state_tokens import reply_token_budget

    on_gpu = torch.cuda.is_available()
    settings = EngineSettings(
        model=str(args.model),
        dtype=args.dtype,
        enforce_eager=not on_gpu,
        kv_cache_bytes=None if on_gpu else args.kv_cache_mib << 20,
    )
    try:
        frames = video_file_frames(args.video.read_bytes()) if args.video else []
        images = [p.read_bytes() for p in args.image]
        audios = [p.read_bytes() for p in args.audio]
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    voice: tuple[str, Path] | None = None
    if args.speech_out is not None:  # which voice, before minutes of engine start
        try:
            voice = _reply_voice(str(args.model))
        except (RuntimeError, ValueError) as exc:
            print(f"error: --speech-out: {exc}", file=sys.stderr)
            return 2
    engine = await VitaEngine.start(settings)
    try:
        prompt = user_input(engine.prompts, text=args.text, images=images, audios=audios, video_frames=frames)
    except (InvalidMediaError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        await engine.shutdown()
        return 2
    first: int | None = None
    reply = ""
    try:
        # --max-tokens counts the reply: the state token comes on top (as in chat and realtime).
        sampling = Sampling(max_tokens=reply_token_budget(args.max_tokens, engine.state_tokens))
        async for delta in engine.generate(prompt, sampling=sampling):
            if first is None and delta.token_ids:
                first = delta.token_ids[0]
                print(f"[state token] {_describe_state(engine, first)}", flush=True)
            print(delta.text, end="", flush=True)
            reply += delta.text
            if delta.finish_reason:
                print(f"\n[finished: {delta.finish_reason}]")
    finally:
        await engine.shutdown()
    if voice is not None:
        return await asyncio.to_thread(_speak_reply, reply, voice, args, engine.tokenizer)
    return 0


def _reply_voice(model: str) -> tuple[str, Path]:
    """("vita", checkpoint dir) when it ships its speech decoder, else ("espeak", dir) if espeak is installed."""
    from models.checkpoint import CheckpointError, resolve_model_dir
    from models.vita_tts.config import TTSConfigError, find_tts_dir, open_tts_checkpoint

    try:
        model_dir = resolve_model_dir(model)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from exc
    if find_tts_dir(model_dir) is not None:
        try:
            open_tts_checkpoint(model_dir)
        except TTSConfigError as exc:
            raise ValueError(f"the checkpoint's voice is unusable: {exc}") from exc
        return "vita", model_dir
    from duplex.tts import EspeakTTS, EspeakUnavailableError

    try:
        EspeakTTS()
    except EspeakUnavailableError as exc:
        raise RuntimeError(f"{model} has no vita_tts_ckpt/ (its own voice), and espeak is not here either: "
                           f"{exc}") from exc
    return "espeak", model_dir


def _speak_reply(reply: str, voice: tuple[str, Path], args: argparse.Namespace, tokenizer: object) -> int:
    """The reply, cut into sentences as the server cuts it, spoken into args.speech_out (16-bit mono WAV)."""
    import wave

    import numpy as np

    from duplex.sentences import SentenceChunker

    chunker = SentenceChunker()
    sentences = [s for s in [*chunker.push(reply), *chunker.flush()] if s.strip()]
    kind, model_dir = voice
    if kind == "vita":
        from models.vita_tts.offline import synthesize

        audio, rate = synthesize(model_dir, sentences, max_tokens=args.speech_max_tokens, tokenizer=tokenizer)
        how = "the checkpoint's own voice (vita_tts_ckpt/)"
    else:
        from duplex.tts import EspeakTTS

        tts = EspeakTTS()
        audio, rate = tts.synthesize_blocking(" ".join(sentences)), tts.sample_rate
        how = "espeak (the checkpoint has no vita_tts_ckpt/)"
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).round().astype("<i2")
    try:
        with wave.open(str(args.speech_out), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(pcm.tobytes())
    except OSError as exc:
        print(f"error: --speech-out {args.speech_out}: {exc}", file=sys.stderr)
        return 2
    print(f"[speech] {len(sentences)} sentence(s), {pcm.size / rate:.2f} s at {rate} Hz, {how} -> {args.speech_out}")
    return 0


def _describe_state(engine, token_id: int) -> str:  # type: ignore[no-untyped-def]
    from models.state_tokens import classify_first_token

    text = engine.tokenizer.decode([token_id])
    if engine.state_tokens is None:
        return f"{token_id} {text!r} (checkpoint has no state tokens)"
    kind = classify_first_token(token_id, engine.state_tokens)
    return f"{token_id} {text!r} ({'not a state token' if kind == 'unknown' else kind})"


if __name__ == "__main__":
    raise SystemExit(main())
