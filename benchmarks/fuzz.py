"""Fuzz the fusion engine: thousands of random structured graphs through ``converter.fuse``.

    python benchmarks/fuzz.py [--n 2000] [--seed 0] [--policy cost|always|both] [--only INDEX]
                              [--shuffle]

Graph ``i`` is built by the generator of ``tests/fusion/random_structures.py`` from a numpy
generator seeded with ``(seed, i)``, so ``--seed S --only I`` rebuilds exactly one graph. Each
graph is checked for properties (a) to (f) of that module (checker and onnxruntime load, outputs
against float64, idempotence, node order, the IR invariants after every merge, report records),
under ``--policy`` (both by default). ``--shuffle`` also checks (g): the graph with the nodes of
every graph listed in a random order, not a topological one, fuses to the same result. Prints one line per failure with its reproducer and the path
of the original model saved in a temporary folder, then a one-line summary. Exits 1 if any graph
failed, else 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

# The engine checks its IR invariants after every merge (property (e)); set before it is imported.
os.environ.setdefault("ONNX_FUSE_CHECK_EVERY_REWRITE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("", "tests", "tests/fusion")]

import onnx  # noqa: E402
from fusion.random_structures import (  # noqa: E402
    IMAGE_BLOCKS,
    RngChoices,
    check_case,
    generate,
    op_counts,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of graphs (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--policy", choices=("cost", "always", "both"), default="both")
    parser.add_argument("--only", type=int, default=None, help="check only graph INDEX")
    parser.add_argument(
        "--shuffle",
        action="store_true",
        help="also list every graph's nodes in a random, not topological, order (property (g))",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print failure tracebacks")
    return parser.parse_args(argv)


def _property(error: BaseException) -> str:
    """Which property failed: the letter an assertion starts with, else the exception type."""
    text = str(error)
    if isinstance(error, AssertionError) and text[:3] in {f"({c})" for c in "abcdefg"}:
        return text[:3]
    if type(error).__name__ == "EngineError":
        return "(e)"
    return type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    policies = ("cost", "always") if args.policy == "both" else (args.policy,)
    indices = [args.only] if args.only is not None else range(args.n)
    folder = Path(tempfile.mkdtemp(prefix="onnx-fuse-fuzz-"))
    stats: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()
    for i in indices:
        case = generate(RngChoices(args.seed, i))
        stats["graphs"] += 1
        stats["nodes"] += sum(op_counts(case.model).values())
        stats["with If"] += "if" in case.blocks
        stats["with Conv"] += bool(IMAGE_BLOCKS & set(case.blocks))
        for policy in policies:
            try:
                outcome = check_case(case, policy, shuffle_seed=i, scramble=args.shuffle)
            except Exception as e:  # every failure is reported; none hides the others
                failed[_property(e)] += 1
                _report_failure(args, i, policy, case.model, e, folder, None)
                continue
            stats["checks"] += 1
            stats[f"fusions {policy}"] += outcome.fusions
            stats[f"merged {policy}"] += outcome.fusions > 0
    seconds = time.perf_counter() - start
    if not failed:
        folder.rmdir()
    print(_summary(args, policies, stats, failed, seconds, folder))
    return 1 if failed else 0


def _report_failure(
    args, index: int, policy: str, model, error: Exception, folder: Path, known: str | None
) -> None:
    path = folder / f"fuzz-seed{args.seed}-{index}.onnx"
    if not path.exists():
        onnx.save(model, path)
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    tag = f" [known engine bug: {known}]" if known else ""
    print(
        f"FAIL {_property(error)} seed={args.seed} index={index} policy={policy}: {message[:300]}"
        f"{tag}\n     model: {path}\n     rerun: python benchmarks/fuzz.py --seed {args.seed} "
        f"--only {index} --policy {policy}{' --shuffle' * args.shuffle} -v",
        flush=True,
    )
    if args.verbose:
        traceback.print_exception(error)


def _summary(args, policies, stats, failed, seconds: float, folder: Path) -> str:
    merged = ", ".join(
        f"{p}: {stats[f'merged {p}']} merged ({stats[f'fusions {p}']} fusions)" for p in policies
    )
    failures = sum(failed.values())
    by_property = " ".join(f"{k}={v}" for k, v in sorted(failed.items())) or "none"
    where = f"; models in {folder}" if failures else ""
    mode = " shuffled (nodes listed out of order)" if args.shuffle else ""
    return (
        f"fuzz{mode} seed={args.seed}: {stats['graphs']} graphs ({stats['nodes']} nodes, "
        f"{stats['with If']} with If, {stats['with Conv']} with Conv) x {len(policies)} "
        f"{'policies' if len(policies) > 1 else 'policy'}: {stats['checks']} passed, "
        f"{failures} failed (by property: {by_property}); {merged}; {seconds:.0f} s{where}"
    )


if __name__ == "__main__":
    sys.exit(main())
