"""Issue 18: what onnxruntime runs of each fused model, against what it runs of the original.

Every whole network of ``tests/archs`` (vision: ResMLP, LeViT, DeiT-III-like ViT with exact and
tanh GELU, ConvNeXt, EfficientFormer, MLP-Mixer; re-parameterised: RepVGG, MobileOne, RepViT,
FastViT) and the three LoRA language models of ``tests/archs/language.py`` (BERT, GPT-2, LLaMA),
each exported by both torch exporters and fused with ``converter.fuse_file`` (validation on; the
language models on their token ids). Per model and exporter it prints:

* ``ORT nodes``: nodes of the graph onnxruntime runs (CPU, extended optimisations, the graph it
  saves), original -> fused;
* ``fused kernels``: its fused kernels (``converter.equivalence.kernels``), original -> fused,
  and the ones lost;
* ``fused/orig``: latency of the fused model over the original's (1 intra-op and 1 inter-op
  thread, default optimisations; after a warm-up, rounds interleave the models in a rotating
  order, each round times ``--inner`` runs per model; min over 5 blocks of rounds of the median).
  The original runs in two sessions, and the faster stands for it (``orig ms``);
* ``orig/orig``: the original's second session over its first, in the same rounds: the noise of
  this measurement (on a shared machine two sessions of one file can differ by 10-40%);
* ``fused/deploy`` for the re-parameterised families: the fused training form against the deploy
  form the block's ``reparameterize()`` makes, exported by the same exporter (target <= 1.05x).

Targets: no model loses a fused kernel; no model is slower than its original beyond the noise
(a row is ``slower`` when ``fused/orig - 1`` exceeds both its own ``|orig/orig - 1|`` and the
run's median of them, so that one lucky quiet pair does not set the bar); fused/deploy <= 1.05x.
The last column says which a row misses. Exits 0; nothing is asserted.

    python benchmarks/runtime.py [--rounds 30] [--inner 20] [--models NAME ...] [--exporters ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from _archs import EXPORTERS, export_and_fuse, export_and_fuse_lm, print_table, time_models
from archs import reparam, vision
from archs.export import export_onnx

from converter.equivalence.kernels import FUSED_KERNELS, lost_kernels, runtime_graph_ops

TARGET_DEPLOY = 1.05
LANGUAGE_MODELS = ("bert", "gpt2", "llama")
_SHORT = {
    "LayerNormalization": "LN",
    "SkipLayerNormalization": "SkipLN",
    "SimplifiedLayerNormalization": "SimplifiedLN",
    "SkipSimplifiedLayerNormalization": "SkipSimplifiedLN",
}


def _kernels(path: Path) -> tuple[int, dict[str, int]]:
    """(nodes onnxruntime runs, its fused kernels) of ``path``."""
    ops = runtime_graph_ops(path)
    return sum(ops.values()), {k: ops[k] for k in FUSED_KERNELS if ops[k]}


def _kernel_line(before: dict[str, int], after: dict[str, int]) -> str:
    names = [k for k in FUSED_KERNELS if k in before or k in after]
    return ", ".join(f"{_SHORT.get(k, k)} {before.get(k, 0)}->{after.get(k, 0)}" for k in names)


def _measure(name, exporter, before, after, status, feed, args, deploy=None) -> dict:
    """One row's figures: kernels and nodes of both models, and their latencies."""
    after = after or before
    (n0, k0), (n1, k1) = _kernels(before.path), _kernels(after.path)
    paths = [before.path, before.path, after.path] + ([deploy] if deploy else [])
    times = time_models(paths, feed, args.rounds, args.inner)
    return {
        "name": name, "exporter": exporter, "status": status, "nodes": f"{n0} -> {n1}",
        "kernels": _kernel_line(k0, k1), "lost": lost_kernels(k0, k1),
        "fused": times[2] / min(times[:2]), "noise": times[1] / times[0],
        "deploy": times[2] / times[3] if deploy else None, "ms": min(times[:2]) * 1e3,
    }  # fmt: skip


def _vision(names: list[str], exporters: list[str], workdir: Path, args) -> list[dict]:
    rows = []
    for name in names:
        build = vision.NETWORKS.get(name) or reparam.NETWORKS[name]
        case = build()
        deploy_module = case.module.reparameterize().eval() if name in reparam.NETWORKS else None
        for exporter in exporters:
            before, after, status = export_and_fuse(case, name, exporter, workdir)
            deploy = None
            if deploy_module is not None:
                deploy = workdir / f"{name}-{exporter}.deploy.onnx"
                export_onnx(deploy_module, case.args, deploy, dynamo=EXPORTERS[exporter])
            feed = case.args[0].numpy()
            rows.append(_measure(name, exporter, before, after, status, feed, args, deploy))
    return rows


def _language(names: list[str], exporters: list[str], workdir: Path, args) -> list[dict]:
    rows = []
    for name in names:
        for exporter in exporters:
            before, after, status, feeds = export_and_fuse_lm(name, exporter, workdir)
            rows.append(_measure(name, exporter, before, after, status, feeds, args))
    return rows


def _slower(row: dict, floor: float) -> bool:
    """Slower than the original beyond the noise: the row's own and the run's median."""
    return row["fused"] - 1 > max(abs(row["noise"] - 1), floor)


def _verdict(row: dict, floor: float) -> str:
    misses = [f"lost {', '.join(row['lost'])}"] if row["lost"] else []
    if _slower(row, floor):
        misses.append("slower")
    if row["deploy"] is not None and row["deploy"] > TARGET_DEPLOY:
        misses.append(f"> {TARGET_DEPLOY}x deploy")
    return "; ".join(misses) or "ok"


def _print(rows: list[dict]) -> None:
    noises = [abs(r["noise"] - 1) for r in rows]
    floor = statistics.median(noises)
    header = ["model", "exporter", "validation", "ORT nodes", "fused kernels (orig->fused)",
              "orig ms", "fused/orig", "orig/orig", "fused/deploy", "verdict"]  # fmt: skip
    table = [
        [r["name"], r["exporter"], r["status"], r["nodes"], r["kernels"] or "-",
         f"{r['ms']:.3f}", f"{r['fused']:.3f}x", f"{r['noise']:.3f}x",
         "-" if r["deploy"] is None else f"{r['deploy']:.3f}x", _verdict(r, floor)]
        for r in rows
    ]  # fmt: skip
    print_table(header, table)
    lost = sum(bool(r["lost"]) for r in rows)
    slower = sum(_slower(r, floor) for r in rows)
    print(f"\nnoise |orig/orig - 1| (the original against itself): median {floor:.1%}, "
          f"largest {max(noises):.1%} in this run")  # fmt: skip
    print(
        f"models x exporters: {len(rows)}; losing a fused kernel: {lost}; slower beyond the noise: {slower}"
    )
    deploy = [r["deploy"] for r in rows if r["deploy"] is not None]
    if deploy:
        print(f"fused/deploy: {min(deploy):.3f}x - {max(deploy):.3f}x (target <= {TARGET_DEPLOY}x)")
    print("kernels: " + ", ".join(f"{v} = {k}" for k, v in _SHORT.items()))


def main(argv: list[str] | None = None) -> int:
    networks = [*vision.NETWORKS, *reparam.NETWORKS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=[*networks, *LANGUAGE_MODELS],
                        choices=[*networks, *LANGUAGE_MODELS])  # fmt: skip
    parser.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=list(EXPORTERS))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the exporters' and transformers' notices
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        vision_names = [m for m in args.models if m in networks]
        lm_names = [m for m in args.models if m in LANGUAGE_MODELS]
        rows = _vision(vision_names, args.exporters, workdir, args)
        rows += _language(lm_names, args.exporters, workdir, args)
    _print(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
