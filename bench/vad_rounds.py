"""The server main process's CPU per VAD window of a round (issue 14): the bookkeeping around the model call.

100 real-time streams, each pushing 20 ms of 16 kHz audio at its own phase; a round every 12.8 ms (as VadHub
runs them under load: ~39 windows a round, ~78 rounds a second). Per window of a round, the main process's
CPU (its thread's CPU time) for:

* worker: `VadBank.take_round`, `VadWorker.submit` (windows and states into shared memory), the reply read,
  `VadBank.finish_round`, and the hub's backlog check; the model runs in the worker (not counted);
* in-process: the same without the worker, the model call's own CPU time subtracted;
* push: one 20 ms `VadStream.push`.

"before" runs the code of ``--before`` (a git revision; default: the last commit before the state table)
loaded from git, against the same model, worker process and audio; "after" the working tree. The two
alternate, ``--repeats`` times each; the table gives the medians.

    .venv/bin/python bench/vad_rounds.py [--streams 100 --seconds 10 --repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from duplex import vad
from duplex.vad import SileroModel
from duplex.vad_worker import VadWorker

BEFORE = "6f06a99"  # the last commit whose rounds copied states per stream (np.stack, np.concatenate, float())
CHUNK = 320  # 20 ms at 16 kHz: a client's usual append
ROUND_S = 0.0128  # VadHub's round interval under load (issue 14's measurement: ~78 rounds a second)


def load_before(rev: str) -> ModuleType | None:
    """``duplex/vad.py`` as it was at ``rev``, as module ``duplex._vad_before`` (None without git or rev)."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:duplex/vad.py"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no 'before' column: git show {rev}:duplex/vad.py failed ({exc})")
        return None
    spec = importlib.util.spec_from_loader("duplex._vad_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:duplex/vad.py", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def submit_before(worker: VadWorker, windows: list[np.ndarray], states: list[np.ndarray]) -> None:
    """`VadWorker.submit` before the state table (same shared layout): a stack and a concatenate."""
    b = len(windows)
    areas = worker._areas
    assert areas is not None and worker._conn is not None
    np.stack(windows, out=areas.windows(b))
    np.concatenate(states, axis=1, out=areas.states(b))
    worker._conn.send_bytes(b.to_bytes(4, "little"))
    worker._in_flight = b


class TimedModel:
    """The model, counting the CPU time of its calls (subtracted from the in-process figures)."""

    def __init__(self, inner: SileroModel) -> None:
        self.inner, self.cpu_ns = inner, 0

    def run_batch(self, windows: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.thread_time_ns()
        out = self.inner.run_batch(windows, states)
        self.cpu_ns += time.thread_time_ns() - t0
        return out


def schedule(streams: int, seconds: float) -> list[list[int]]:
    """For each round, the streams that push 20 ms before it (each at its own phase)."""
    phases = np.random.default_rng(14).uniform(0, 0.020, streams)
    rounds = []
    for k in range(int(seconds / ROUND_S)):
        t0, t1 = k * ROUND_S, (k + 1) * ROUND_S
        rounds.append([i for i in range(streams)
                       for n in range(int((t1 - phases[i]) // 0.020) - int((t0 - phases[i]) // 0.020))])
    return rounds


def run(mod: ModuleType, model: TimedModel, worker: VadWorker | None, streams: int, rounds: list[list[int]],
        audio: np.ndarray, old: bool) -> tuple[float, float]:
    """(µs of main-process CPU per window of a round, µs per push)."""
    bank = mod.VadBank(model)
    for i in range(streams):
        bank.add_stream(i)
    cursor = [i * 7_919 % (audio.size - CHUNK) for i in range(streams)]
    round_ns = push_ns = windows = pushes = 0
    model.cpu_ns = 0
    for pushers in rounds:
        t0 = time.thread_time_ns()
        for i in pushers:
            c = cursor[i]
            bank.push(i, audio[c : c + CHUNK])
            cursor[i] = (c + CHUNK) % (audio.size - CHUNK)
        t1 = time.thread_time_ns()
        group = bank.take_round(worker.rows if worker is not None else None)
        if group:
            if worker is None:
                reply = bank.score_round(group)
            elif old:
                submit_before(worker, [w for _, _, w in group], [s.state for _, s, _ in group])
                reply = worker.reply(block=True)
            else:
                worker.submit(group.windows, bank.state_table, group.slots)
                reply = worker.reply(block=True)
            bank.finish_round(group, *reply)
            # the hub's check for a backlog (VadHub._finish)
            any(s.windows_ready for _, s, _ in group) if old else any(s.windows_ready for s in group.streams)
        t2 = time.thread_time_ns()
        push_ns, round_ns = push_ns + t1 - t0, round_ns + t2 - t1
        pushes, windows = pushes + len(pushers), windows + len(group)
    return (round_ns - model.cpu_ns) / 1e3 / windows, push_ns / 1e3 / pushes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per stream per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", default=BEFORE, help="git revision of the 'before' code")
    args = ap.parse_args()

    model = TimedModel(SileroModel())
    audio = (np.random.default_rng(1).standard_normal(16_000 * 7) * 0.05).astype(np.float32)
    rounds = schedule(args.streams, args.seconds)
    before = load_before(args.before)
    variants = ([("before", before, True)] if before is not None else []) + [("after", vad, False)]
    worker = VadWorker(graph=model.inner.graph, model_path=model.inner.path)
    worker.start()
    results: dict[tuple[str, str], list[float]] = {}
    try:
        worker.wait_started()
        per_round = sum(map(len, rounds)) / len(rounds) * CHUNK / 512
        print(f"{args.streams} streams, {len(rounds)} rounds of ~{per_round:.0f} windows, "
              f"{args.repeats} alternating repeats (medians)")
        for _ in range(args.repeats):
            for name, mod, old in variants:
                for path, w in (("worker", worker), ("in-process", None)):
                    per_window, per_push = run(mod, model, w, args.streams, rounds, audio, old)
                    results.setdefault((name, path), []).append(per_window)
                    results.setdefault((name, "push"), []).append(per_push)
    finally:
        worker.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{'µs per window (main process)':32}" + "".join(f"{n:>10}" for n, _, _ in variants)
          + ("     ratio" if before is not None else ""))
    for path in ("worker", "in-process", "push"):
        label = "µs per 20 ms push" if path == "push" else f"round bookkeeping, {path}"
        row = [med[(n, path)] for n, _, _ in variants]
        print(f"{label:32}" + "".join(f"{x:10.2f}" for x in row) + (f"{row[0] / row[1]:9.2f}x" if len(row) == 2 else ""))


if __name__ == "__main__":
    main()
