"""Rewrite the stock Silero ONNX graph so that every Conv is one batched MatMul.

onnxruntime's CPU Conv runs im2col + a small GEMM per batch item, so a batch of 1024 windows costs 1024
tiny GEMMs per layer. Each 1-D Conv here becomes: channels-last Transpose, zero Pad, im2col by Slice
(+ Reshape) and Concat, then ONE MatMul over ``batch * frames`` rows with the kernel laid out as
``[K*C, O]``, plus bias, and a Transpose back. onnxruntime's transpose optimizer cancels the
Transposes that meet across Relu. Inputs, outputs and every other node are left as they are.

The STFT Conv (kernel = a windowed DFT basis, the largest layer) also gets its frames folded,
``x[n] + x[K-n]`` for the cosine rows and ``x[n] - x[K-n]`` for the sine rows, which halves its
multiply-adds; this is exact because those rows are mirror-(anti)symmetric, checked on the weights.

The weights are read from the graph given (the ``silero-vad`` wheel's file) and only re-laid out, in
memory: nothing is written to disk. The rewrite is generic over 1-D, ungrouped, undilated Convs with
constant weights; anything else raises `GraphRewriteError`, and the caller falls back to the stock graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

INT64_MAX = np.iinfo(np.int64).max


class GraphRewriteError(RuntimeError):
    """The graph has a Conv (or a layout) this rewrite does not handle."""


def batched_graph(stock: str | os.PathLike[str] | bytes) -> bytes:
    """The stock model (path or serialized bytes) with each Conv replaced by a batched MatMul."""
    import onnx  # deferred: only needed at load time

    model = onnx.load_from_string(stock) if isinstance(stock, bytes) else onnx.load(Path(stock))
    if _rewrite(model.graph, {}) == 0:
        raise GraphRewriteError("no Conv node found: not the expected Silero graph")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise GraphRewriteError(f"rewritten graph is invalid: {e}") from e
    return model.SerializeToString()


def _rewrite(graph, outer: dict[str, np.ndarray]) -> int:
    """Rewrite the Convs of ``graph`` and its subgraphs (If branches) in place; return how many."""
    from onnx import helper, numpy_helper

    consts = dict(outer)
    consts.update({t.name: numpy_helper.to_array(t) for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            value = _attr(node, "value")
            if value is not None:
                consts[node.output[0]] = numpy_helper.to_array(value)

    count, nodes, spent = 0, [], set()
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                count += _rewrite(attr.g, consts)
            elif attr.type == attr.GRAPHS:
                count += sum(_rewrite(g, consts) for g in attr.graphs)
        if node.op_type == "Conv":
            nodes += _conv_as_matmul(node, consts, helper, numpy_helper)
            spent.update(node.input[1:])
            count += 1
        else:
            nodes.append(node)
    # Drop the stock kernels' Constant nodes that nothing reads any more.
    used = set(_used_names(graph, nodes))
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in spent - used)]
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _conv_as_matmul(node, consts: dict[str, np.ndarray], helper, numpy_helper) -> list:
    """The nodes computing ``node`` (a 1-D Conv, NCT layout) as im2col + one MatMul."""
    name = node.name or node.output[0]
    weight = consts.get(node.input[1])
    bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if weight is None or weight.ndim != 3:
        raise GraphRewriteError(f"{name}: needs a constant 1-D kernel [O, C, K]")
    if len(node.input) > 2 and node.input[2] and bias is None:
        raise GraphRewriteError(f"{name}: bias is not a constant")
    out_ch, in_ch, k = weight.shape
    group = _attr(node, "group", 1)
    dilations = list(_attr(node, "dilations", [1]))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    if group != 1 or dilations != [1] or auto_pad not in (b"NOTSET", "NOTSET"):
        raise GraphRewriteError(f"{name}: grouped, dilated or auto-padded Conv is not handled")
    [stride] = list(_attr(node, "strides", [1]))
    pad_lo, pad_hi = list(_attr(node, "pads", [0, 0]))

    nodes: list = []
    n = 0

    def tmp() -> str:
        nonlocal n
        n += 1
        return f"{name}/mm/{n}"

    def const(value: np.ndarray) -> str:
        out = tmp()
        nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(value, out)))
        return out

    def i64(*values: int) -> str:
        return const(np.array(values, dtype=np.int64))

    def add(op: str, inputs: list[str], **attrs) -> str:
        out = tmp()
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    x = add("Transpose", [node.input[0]], perm=[0, 2, 1])  # [N, T, C]
    if pad_lo or pad_hi:
        x = add("Pad", [x, i64(0, pad_lo, 0, 0, pad_hi, 0)], mode="constant")
    # im2col, columns ordered tap-major (k * C + c) to match the kernel layout below.
    if k % stride == 0:
        # Kernel a whole number of strides long (the STFT: 256 = 2 * 128): m slices of whole
        # strides, each reshaped to [N, frames, stride * C]. Needs (T + pads - K) % stride == 0,
        # true for the window sizes Silero accepts; another size fails loudly in the Reshape.
        m = k // stride
        pieces = []
        for j in range(m):
            end = INT64_MAX if j == m - 1 else -(m - 1 - j) * stride
            piece = x if m == 1 else add("Slice", [x, i64(j * stride), i64(end), i64(1)])
            if stride > 1:
                piece = add("Reshape", [piece, i64(0, -1, stride * in_ch)])
            pieces.append(piece)
    else:
        # One strided slice per tap: tap t of output frame f reads padded frame f * stride + t.
        pieces = [
            add("Slice", [x, i64(t), i64(INT64_MAX if t == k - 1 else t - (k - 1)), i64(1), i64(stride)])
            for t in range(k)
        ]
    cols = pieces[0] if len(pieces) == 1 else add("Concat", pieces, axis=2)  # [N, F, K*C]
    split = _mirror_split(weight)
    if split is None:
        kernel = weight.transpose(2, 1, 0).reshape(k * in_ch, out_ch)
        y = add("MatMul", [cols, const(np.ascontiguousarray(kernel))])  # [N, F, O]
    else:
        # Windowed-DFT kernel (the STFT): output rows [0, split) are mirror-symmetric about K/2 and
        # rows [split, O) antisymmetric, so fold each frame first, x[n] +/- x[K-n], and multiply
        # by half-width kernels: half the multiply-adds of the largest layer.
        h = k // 2
        head = add("Slice", [cols, i64(1), i64(h), i64(2)])  # x[1 .. K/2-1]
        tail = add("Slice", [cols, i64(k - 1), i64(h), i64(2), i64(-1)])  # x[K-1 .. K/2+1]
        parts = []
        if split > 0:
            x0 = add("Slice", [cols, i64(0), i64(1), i64(2)])
            xh = add("Slice", [cols, i64(h), i64(h + 1), i64(2)])
            sym = add("Concat", [add("Add", [head, tail]), x0, xh], axis=2)  # x[n] + x[K-n], x[0], x[K/2]
            kernel = np.concatenate([weight[:split, 0, 1:h], weight[:split, 0, [0, h]]], axis=1).T
            parts.append(add("MatMul", [sym, const(np.ascontiguousarray(kernel))]))
        if split < out_ch:
            kernel = weight[split:, 0, 1:h].T
            parts.append(add("MatMul", [add("Sub", [head, tail]), const(np.ascontiguousarray(kernel))]))
        y = parts[0] if len(parts) == 1 else add("Concat", parts, axis=2)
    if bias is not None:
        y = add("Add", [y, const(bias.astype(weight.dtype))])
    nodes.append(helper.make_node("Transpose", [y], [node.output[0]], name=f"{name}/mm/out", perm=[0, 2, 1]))
    return nodes


def _mirror_split(weight: np.ndarray) -> int | None:
    """For a one-channel kernel of even width K whose first rows are symmetric (w[n] == w[K-n]) and
    the remaining rows antisymmetric (w[n] == -w[K-n], w[0] == w[K/2] == 0), the number of symmetric
    rows; None for any other kernel. A windowed DFT basis with a periodic window is such a kernel."""
    out_ch, in_ch, k = weight.shape
    if in_ch != 1 or k % 2 or k < 4:
        return None
    w = weight[:, 0, :]
    mirrored = w[:, k - np.arange(1, k)]  # w[K - n] for n = 1 .. K-1
    tol = 1e-6 * float(np.abs(w).max())
    odd = (np.abs(w[:, 1:] + mirrored).max(axis=1) <= tol) & (np.abs(w[:, [0, k // 2]]).max(axis=1) <= tol)
    even = np.abs(w[:, 1:] - mirrored).max(axis=1) <= tol
    split = int(np.argmax(odd)) if odd.any() else out_ch
    if not (even[:split].all() and odd[split:].all()):
        return None
    return split


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _used_names(graph, nodes) -> Iterator[str]:
    """Every value name read by ``nodes`` (subgraphs included, as they may read outer names)."""
    yield from (o.name for o in graph.output)
    for node in nodes:
        yield from node.input
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from _used_names(attr.g, attr.g.node)
            elif attr.type == attr.GRAPHS:
                for g in attr.graphs:
                    yield from _used_names(g, g.node)


def check_equivalent(candidate, reference, atol: float = 1e-4) -> float:
    """Run two onnxruntime sessions of the Silero graph on the same fixed input and raise
    `GraphRewriteError` unless probabilities and states agree within ``atol``; return the max difference.

    The input is deterministic: 3 streams of harmonic tone bursts in noise (probabilities from ~0.02 to
    ~0.99), 12 windows with the LSTM state carried from a random start, at both sample rates the graph
    takes (16 kHz: 64 + 512 samples, 8 kHz: 32 + 256).
    """
    rng = np.random.default_rng(1234)
    worst = 0.0
    for rate, context, window in ((16_000, 64, 512), (8_000, 32, 256)):
        steps = 12
        audio = _tone_bursts(rate, steps * window + context, rng)
        states = [rng.standard_normal((2, audio.shape[0], 128)).astype(np.float32) * 0.5] * 2
        sr = np.array(rate, dtype=np.int64)
        for step in range(steps):
            x = np.ascontiguousarray(audio[:, step * window : step * window + context + window])
            (p_new, s_new), (p_ref, s_ref) = (
                s.run(None, {"input": x, "state": st, "sr": sr})
                for s, st in zip((candidate, reference), states)
            )
            if p_new.shape != p_ref.shape or s_new.shape != s_ref.shape:
                raise GraphRewriteError(f"output shapes differ: {p_new.shape} vs {p_ref.shape}")
            diff = max(float(np.abs(p_new - p_ref).max()), float(np.abs(s_new - s_ref).max()))
            worst = max(worst, diff)
            if not diff <= atol:  # also catches NaN
                raise GraphRewriteError(
                    f"differs from the stock graph by {diff:.3g} at {rate} Hz, window {step}"
                )
            states = [s_new, s_ref]
    return worst


def _tone_bursts(rate: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(3, size) float32: five-harmonic tones at 110/180/260 Hz, 3 Hz amplitude-modulated, in noise."""
    t = np.arange(size) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    tones = [
        sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * envelope for f0 in (110, 180, 260)
    ]
    return (0.3 * np.stack(tones) + 0.01 * rng.standard_normal((3, size))).astype(np.float32)
