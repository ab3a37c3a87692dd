"""Issue 22: models from other producers, fused with the defaults, against hand-folded models.

The fixtures of ``models/producers`` (Keras 3 via tf2onnx, Flax NNX via jax2onnx, scikit-learn
via skl2onnx; see that folder's README) are fused with ``converter.fuse_file`` (validation on).
Per producer and model it prints: constant-weight linear ops (Gemm, MatMul, Conv,
LinearRegressor, LinearClassifier) original -> fused -> hand-folded (``manifest.json``),
BatchNormalization before -> after, free folds left (``tests/archs/free_folds.py``), op counts
over the hand-folded bounds, fused onnxruntime kernels lost, the validation result, and whether
the hand-folded target is reached; ``--left`` adds, per model, what is left in words. Needs
none of the frameworks. Exits 0; nothing is asserted.

    python benchmarks/producers.py [--left]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]  # the checkout and its fixtures' measurer

from producers import measure  # noqa: E402


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain text table, columns padded to the widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--left", action="store_true", help="print what is left per model")
    args = parser.parse_args(argv)
    header = ["producer", "model", "linear orig -> fused -> hand", "BN", "free folds",
              "over bounds", "kernels lost", "validation", "target"]  # fmt: skip
    rows, results = [], []
    for fixture in measure.fixtures().values():
        r = measure.fuse(fixture)
        results.append(r)
        after = "-" if r.linear_after is None else r.linear_after
        bn = f"{r.batchnorm_before} -> {'-' if r.batchnorm_after is None else r.batchnorm_after}"
        validation = r.validation
        if r.modified and r.validated:
            validation += f" ({r.fusions} merge{'s' if r.fusions > 1 else ''})"
        rows.append([
            fixture.producer, fixture.name, f"{r.linear_before} -> {after} -> {fixture.hand_folded}",
            bn, len(r.folds), ", ".join(r.over_bounds) or "-", ", ".join(r.lost) or "-",
            validation, "reached" if r.reached else "not yet",
        ])  # fmt: skip
    print_table(header, rows)
    reached = sum(r.reached for r in results)
    print(f"\n{reached} of {len(results)} reach the hand-folded form")
    if args.left:
        for r in results:
            if not r.reached:
                print(f"\n{r.fixture.name}: " + "; ".join(r.left()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
