"""Every PEFT adapter type: onnx-fuse against ``merge_and_unload()``, measured in one run (issue 21).

For each adapter type of ``tests/archs/adapters.py`` (LoRA, DoRA, LoHa, LoKr, IA3, OFT, BOFT,
VeRA, FourierFT, HRA, VBLoRA, RandLoRA, RoAd, MiSS, GraLoRA, DeLoRA, HiRA, ...; non-identity
values), each tiny model (``llama``, ``bert``) and each torch exporter, three ONNX models:

* ``adapter``: the adapter model as exported;
* ``fused``: ``onnx-fuse adapter.onnx --inputs <its token ids>`` (validation on);
* ``merged``: the export of the same model after ``merge_and_unload()`` (the target).

It prints linear ops (``Gemm``, and ``MatMul``/``Einsum`` with a constant operand) adapter ->
fused -> merged, the weight bytes fused / merged, free folds and fused kernels lost, and the
latency fused / merged under onnxruntime (one thread, default optimisations; interleaved rounds,
the quietest of five blocks: as ``benchmarks/lora.py``). Targets: linear ops at most merged's,
weights no larger, latency within 1.05x. An export torch cannot make is a row saying why.
Timings depend on the machine and its load; the script asserts nothing and exits 0.

    python benchmarks/adapters.py [--models llama bert] [--adapters lora dora ...]
        [--exporters dynamo legacy] [--workdir DIR] [--rounds 30 --inner 10]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests"), str(_ROOT / "benchmarks")]

from archs import adapter_runs, adapters, language  # noqa: E402
from lora import _session, _time  # noqa: E402

TARGET = 1.05


def _latency(directory: Path, args) -> float:
    """Seconds per run fused / merged, interleaved."""
    with np.load(directory / "adapter.inputs.npz") as inputs:
        feeds = dict(inputs)
    sessions = {k: _session(directory / f"{k}.onnx") for k in ("fused", "merged")}
    seconds = _time(sessions, dict.fromkeys(sessions, feeds), args.rounds, args.inner)
    return seconds["fused"] / seconds["merged"]


def _row(model: str, adapter: str, exporter: str, directory: Path, args) -> str:
    head = f"{adapter:12s} {model:6s} {exporter:7s}"
    try:
        adapter_runs.export_pair(model, adapter, exporter, directory)
    except language.ExporterCannot as e:
        return f"{head} torch cannot export the adapter model: {str(e)[:110]}"
    code = adapter_runs.fuse(directory)
    m = adapter_runs.measure(directory, code)
    ops = " -> ".join(str(m.ops.get(k, "-")) for k in ("adapter", "fused", "merged"))
    if code != 0:
        return f"{head} {ops:14s} onnx-fuse exit {code}"
    reached = "yes" if m.ops["fused"] <= m.ops["merged"] else "NO "
    weights = m.weights["fused"] / m.weights["merged"]
    ratio = _latency(directory, args)
    extra = "; ".join([*(f"fold {f}" for f in m.folds[:2]), *(f"lost {k}" for k in m.lost)])
    return f"{head} {ops:14s} {reached}  {weights:6.3f}  {ratio:6.2f}x  {extra}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["llama", "bert"])
    parser.add_argument("--adapters", nargs="*", default=list(adapters.ADAPTERS))
    parser.add_argument("--exporters", nargs="*", default=list(adapter_runs.EXPORTERS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="keep the models here (default: a temp dir)")
    args = parser.parse_args(argv)
    for name in ("transformers", "torch", "onnxscript", "converter", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(
        f"onnxruntime {ort.__version__}; linear ops = Gemm + MatMul/Einsum with a constant "
        f"operand; weights and latency fused / merged (1 thread, target <= {TARGET}x)"
    )
    print(
        f"{'adapter':12s} {'model':6s} {'export':7s} {'adapter->fused->merged':14s} reached weights latency"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for adapter in args.adapters:
            for model in args.models:
                if (model, adapter) in adapters.UNMERGEABLE_ON:
                    print(
                        f"{adapter:12s} {model:6s} peft cannot merge it: {adapters.UNMERGEABLE_ON[model, adapter]}"
                    )
                    continue
                for exporter in args.exporters:
                    directory = workdir / f"{adapter}-{model}-{exporter}"
                    try:
                        print(_row(model, adapter, exporter, directory, args), flush=True)
                    except ImportError as e:  # a type's extra module (adamss: scikit-learn)
                        print(f"{adapter:12s} {model:6s} {exporter:7s} skipped: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
