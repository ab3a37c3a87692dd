"""Issue 11: structural re-parameterisation of exported training-form conv networks.

The networks of ``tests/archs/reparam.py`` (BatchNorm statistics randomised), input
``(2, 3, 32, 32)``:

* ``repvgg_a0``: 6 RepVGG blocks (3x3 + BN, 1x1 + BN, identity BN), three with stride 2;
* ``mobileone_s0``: a MobileOne stem and 4 units (depthwise 3x3 and pointwise 1x1 blocks with
  k = 4 over-parameterised branches, a 1x1 scale branch, BN identity);
* ``repvit_m09``, ``fastvit_t8`` (issue 18): RepViT blocks (RepVGGDW token mixer, ConvBN -> GELU
  -> ConvBN channel mixer) and FastViT RepMixer blocks (ConvMlp with GELU, layer scale kept in
  the deploy form, as timm does), a MobileOne stem with GELU and a RepCPE.

Each is exported in its training form and, after its own ``reparameterize()``, in its deploy form,
with both torch exporters. The training form is fused with ``converter.fuse_file`` (validation on).
Per network and exporter it prints: Convs of the original -> fused -> deploy form, free folds
before -> after, BatchNormalization left, the validation result, and latency of the original,
fused and deploy forms under onnxruntime (1 thread, interleaved runs, min over 5 blocks of the median); the target is the
fused model within 1.05x of the deploy form. Exits 0; nothing is asserted.

    python benchmarks/reparam.py [--rounds 30] [--inner 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _archs import EXPORTERS, export_and_fuse, measure, print_table, time_models
from archs import reparam
from archs.export import export_onnx
from archs.vision import Case

TARGET = 1.05


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=20)
    args = parser.parse_args(argv)
    header = ["model", "exporter", "Convs orig -> fused -> deploy", "free folds", "BN left",
              "validation", "orig ms", "fused ms", "deploy ms", "fused/deploy"]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name, build in reparam.NETWORKS.items():
            case = build()
            deploy = Case(case.module.reparameterize().eval(), case.args)
            for exporter in EXPORTERS:
                before, after, status = export_and_fuse(case, name, exporter, workdir)
                after = after or before
                path = workdir / f"{name}-{exporter}.deploy.onnx"
                export_onnx(deploy.module, deploy.args, path, dynamo=EXPORTERS[exporter])
                target = measure(path)
                paths = [before.path, after.path, target.path]
                t0, t1, t2 = time_models(paths, case.args[0].numpy(), args.rounds, args.inner)
                rows.append([
                    name, exporter, f"{before.convs} -> {after.convs} -> {target.convs}",
                    f"{before.folds} -> {after.folds}", after.batchnorm, status,
                    f"{t0 * 1e3:.3f}", f"{t1 * 1e3:.3f}", f"{t2 * 1e3:.3f}", f"{t1 / t2:.2f}x",
                ])  # fmt: skip
    print_table(header, rows)
    print(f"\ntarget: fused/deploy <= {TARGET}x and fused Convs == deploy Convs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
