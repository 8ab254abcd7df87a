"""`vita-duplex inspect MODEL`: the operator's preflight, with no GPU and no engine start.

It opens the checkpoint exactly as the server will (`models.checkpoint`) and reports what it found: the
layout and config format, where every derived value came from, the state tokens and placeholder rows, and
the tensors against the published layout. Any problem makes the exit status non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checkpoint import CheckpointError, check_tensors, open_checkpoint
from .state_tokens import STATE_TOKEN_TEXT


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        out = list(self.lines)
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"problem: {p}" for p in self.problems]
        verdict = "FAILED" if self.problems else "OK"
        out.append(f"{verdict}: {len(self.problems)} problem(s), {len(self.warnings)} warning(s)")
        return "\n".join(out)


def inspect_checkpoint(spec: str) -> Report:
    report = Report()
    try:
        ckpt = open_checkpoint(spec)
    except (CheckpointError, ValueError, OSError) as exc:
        report.lines.append(f"model: {spec}")
        report.problems.append(str(exc))
        return report
    config = ckpt.config
    text = config.get_text_config()
    report.lines += [
        f"model: {spec}",
        f"directory: {ckpt.path}",
        f"config format: {ckpt.config_format}",
        (f"layout: {config.layout} (text model {text.model_type}, {text.num_hidden_layers} layers, "
         f"hidden {text.hidden_size}, vocab {text.vocab_size})"),
        "sources:",
        *(f"  {what}: {source}" for what, source in ckpt.sources.items()),
        "state tokens:",
    ]
    tokenizer = ckpt.tokenizer
    for kind, token_id in (config.state_token_ids or {}).items():
        shown = tokenizer.decode([token_id])
        report.lines.append(f"  {kind}: id {token_id} {shown!r} (expected {STATE_TOKEN_TEXT[config.layout][kind]!r})")
        if shown != STATE_TOKEN_TEXT[config.layout][kind]:
            report.problems.append(f"state token {kind} id {token_id} decodes to {shown!r}")
    if ckpt.config_format == "text":
        report.lines.append("  none: a plain text LLM; speech is heard through input transcription (an empty "
                            "transcript is noise), images and video are dropped")
    elif not config.state_token_ids:
        report.warnings.append("no state tokens: every user turn is answered (no noise gating)")
    if ckpt.config_format != "text":  # a plain text LLM takes no placeholders
        report.lines.append(
            f"placeholder rows: image {config.image_token_index}, audio {config.audio_token_index} "
            f"(tokenizer size {len(tokenizer)}, embedding rows {text.vocab_size})")
        try:
            config.validate_placeholders(len(tokenizer))
        except ValueError as exc:
            report.problems.append(str(exc))
    check = check_tensors(ckpt)
    report.lines.append(f"tensors: {len(ckpt.tensor_shapes)} found, layout expects "
                        f"{len(ckpt.tensor_shapes) - len(check.unexpected) + len(check.missing)}")
    report.problems += check.describe()
    report.warnings += ckpt.warnings
    from .vita_tts.offline import check_voice  # torch: imported only once the checkpoint opened

    voice = check_voice(ckpt.path)  # its vita_tts_ckpt/ (inside or beside the checkpoint): VITA-1.5's own voice
    report.lines += voice.lines
    report.problems += voice.problems
    return report
