"""Issue 10: free folds left in whole vision networks as the two torch exporters write them.

The networks of ``tests/archs/vision.py`` (random weights; BatchNorm statistics, affines and
layer scales randomised), input ``(2, 3, 32, 32)``:

* ``resmlp``: MLP-only classifier (patch embedding Linear, 4 ResMLP blocks with Affine and layer
  scale, token-mixing Linear, head);
* ``levit``: hybrid conv stem + 2 LeViT attention/MLP blocks with Linear + BatchNorm1d on tokens;
* ``deit_distilled``: ViT with layer scale, class and distillation tokens, two averaged heads
  (``deit_tanh``: the same with tanh GELU);
* issue 18's ``convnext``, ``efficientformer`` and ``mixer`` (see ``benchmarks/runtime.py`` for
  what onnxruntime makes of them).

For each network and exporter it prints: constant-weight linear ops (Gemm/MatMul/Conv) before ->
after fusion, free folds before -> after, BatchNormalization left, the validation result, and the
latency of the original and fused model under onnxruntime (1 thread, interleaved runs, min over 5 blocks of the median).
Exits 0; nothing is asserted.

    python benchmarks/real_shapes.py [--rounds 30] [--inner 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _archs import EXPORTERS, export_and_fuse, print_table, time_models
from archs import vision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=20)
    args = parser.parse_args(argv)
    header = ["model", "exporter", "linear", "free folds", "BN left", "validation",
              "original ms", "fused ms", "fused/orig"]  # fmt: skip
    rows, details = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in vision.NETWORKS.items():
            case = build()
            for exporter in EXPORTERS:
                before, after, status = export_and_fuse(case, name, exporter, Path(tmp))
                after = after or before
                t0, t1 = time_models(
                    [before.path, after.path], case.args[0].numpy(), args.rounds, args.inner
                )
                rows.append([
                    name, exporter, f"{before.linear} -> {after.linear}",
                    f"{before.folds} -> {after.folds}", after.batchnorm, status,
                    f"{t0 * 1e3:.3f}", f"{t1 * 1e3:.3f}", f"{t1 / t0:.2f}x",
                ])  # fmt: skip
                details += [f"{name}-{exporter}: {w}" for w in after.where]
    print_table(header, rows)
    if details:
        print("\nfree folds left after fusion:")
        print("\n".join(f"  {d}" for d in details))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
