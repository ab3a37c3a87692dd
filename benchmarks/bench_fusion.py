"""How much faster a fused linear chain runs in onnxruntime, measured in one run.

Three models of ``y = Linear4(Linear3(Linear2(Linear1(x))))`` with ``Linear(512, 512)`` layers,
float32, a 2-D input of batch 8:

* ``original``: four ``Gemm(transB=1)`` nodes, as torch exports them;
* ``fused``: ``converter.fuse(original, policy="cost")``;
* ``hand-merged``: one Gemm whose weight and bias are computed here with numpy,
  ``W = W4 @ W3 @ W2 @ W1`` and ``b = ((b1 @ W2.T + b2) @ W3.T + b3) @ W4.T + b4``.

Each model gets its own onnxruntime session with one intra-op and one inter-op thread. After a
warm-up, rounds interleave the models (in a rotating order) and each round times ``--inner``
consecutive runs per model; a model's time is the minimum over five blocks of rounds of the
median over the block's rounds of the mean run time. The
script prints the ratios, the model sizes and the largest output difference, and exits 0: the
targets are printed, not asserted, because timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, if not installed

import converter

WIDTH = 512
LAYERS = 4
BATCH = 8
SPEEDUP_TARGET = 3.3
HAND_MERGED_TARGET = 1.1
_BLOCKS = 5


def _layers(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(W, b)`` per layer with torch's ``nn.Linear`` init, ``W`` of shape ``(out, in)``."""
    bound = 1.0 / np.sqrt(WIDTH)
    return [
        (
            rng.uniform(-bound, bound, (WIDTH, WIDTH)).astype(np.float32),
            rng.uniform(-bound, bound, WIDTH).astype(np.float32),
        )
        for _ in range(LAYERS)
    ]


def _gemm_model(layers: list[tuple[np.ndarray, np.ndarray]], name: str) -> onnx.ModelProto:
    """A chain of ``Gemm(x, W, b, transB=1)``, one per layer, with a dynamic batch axis."""
    nodes, initializers, current = [], [], "x"
    for i, (weight, bias) in enumerate(layers):
        output = "y" if i == len(layers) - 1 else f"h{i}"
        initializers += [
            numpy_helper.from_array(weight, f"{i}.weight"),
            numpy_helper.from_array(bias, f"{i}.bias"),
        ]
        inputs = [current, f"{i}.weight", f"{i}.bias"]
        nodes.append(helper.make_node("Gemm", inputs, [output], name=f"/{i}/Gemm", transB=1))
        current = output
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _hand_merged(layers: list[tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """``W = Wn @ ... @ W1`` and ``b = (... (b1 @ W2.T + b2) ...) @ Wn.T + bn``, in float64."""
    weight, bias = layers[0][0].astype(np.float64), layers[0][1].astype(np.float64)
    for w, b in layers[1:]:
        weight, bias = w @ weight, bias @ w.T + b
    merged = [(weight.astype(np.float32), bias.astype(np.float32))]
    return _gemm_model(merged, "hand_merged")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _time(sessions: dict[str, ort.InferenceSession], x, rounds: int, inner: int) -> dict:
    """Seconds per run of each model: the minimum over blocks of the median over rounds.

    Each round times ``inner`` consecutive runs of every model, in an order that rotates from
    round to round; the rounds fall into ``_BLOCKS`` blocks, so a burst of load from elsewhere
    on the machine spoils one block's median rather than the result.
    """
    feeds = {"x": x}
    for session in sessions.values():  # warm-up
        for _ in range(inner):
            session.run(None, feeds)
    names = list(sessions)
    medians: dict[str, list[float]] = {name: [] for name in names}
    per_block = max(1, rounds // _BLOCKS)
    for _ in range(_BLOCKS):
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(per_block):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                run = sessions[name].run
                start = time.perf_counter()
                for _ in range(inner):
                    run(None, feeds)
                samples[name].append((time.perf_counter() - start) / inner)
        for name, times in samples.items():
            medians[name].append(statistics.median(times))
    return {name: min(values) for name, values in medians.items()}


def _parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds per model")
    parser.add_argument("--inner", type=int, default=20, help="runs per model per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    layers = _layers(rng)
    models = {"original": _gemm_model(layers, "original")}
    models["fused"] = converter.fuse(models["original"], policy="cost")
    models["hand-merged"] = _hand_merged(layers)
    sessions = {name: _session(model) for name, model in models.items()}
    x = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
    seconds = _time(sessions, x, args.rounds, args.inner)

    print(
        f"{LAYERS} x Linear({WIDTH},{WIDTH}), float32, batch {BATCH}, onnxruntime "
        f"{ort.__version__}, 1 intra-op + 1 inter-op thread, "
        f"min over {_BLOCKS} blocks of the median of {args.rounds // _BLOCKS} rounds x "
        f"{args.inner} runs"
    )
    for name, model in models.items():
        ops = ",".join(node.op_type for node in model.graph.node)
        print(
            f"  {name:<12} {seconds[name] * 1e6:8.1f} us/run  {ops:<19} "
            f"{_parameters(model):>9,} parameters  {model.ByteSize() / 2**20:5.2f} MiB"
        )
    speedup = seconds["original"] / seconds["fused"]
    versus_hand = seconds["fused"] / seconds["hand-merged"]
    print(f"speedup fused/original: {speedup:.2f}x (target >= {SPEEDUP_TARGET}x)")
    print(f"fused vs hand-merged: {versus_hand:.2f}x (target <= {HAND_MERGED_TARGET}x)")
    print(f"size fused/original: {models['fused'].ByteSize() / models['original'].ByteSize():.2f}x")
    outputs = {name: session.run(None, {"x": x})[0] for name, session in sessions.items()}
    for name in ("fused", "hand-merged"):
        difference = np.abs(outputs[name] - outputs["original"]).max()
        print(f"max |{name} - original|: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
