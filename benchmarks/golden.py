"""The behaviour oracle of a refactor: fuse a fixed corpus, digest every result, compare digests.

A refactor of ``converter/fusion/`` must not change what it writes. This script exports a fixed
corpus once (``export``), fuses every model of it with both policies and writes, per model and
policy, a digest (``digest``): the SHA-256 of the fused model's serialised bytes (nodes,
attributes, initializers bit for bit) and the report (``FusionReport.to_dict()`` without its
timing: every fusion record and every declined reason). ``compare`` says which models differ
and how.

The corpus:

* ``models/*.onnx`` and the other producers' fixtures, ``models/producers/*.onnx``;
* every block and network of ``tests/archs/vision.py`` and ``tests/archs/reparam.py``, exported
  by both torch exporters (``tests/archs/export.py::export_onnx``);
* the LoRA language models of ``tests/archs/language.py``, both exporters (where the legacy one
  can);
* the published models ``tests/test_real_models.py`` downloads, when they are in its cache;
* ``--random N`` seeded graphs of ``tests/fusion/random_structures.py``
  (``generate(RngChoices(0, i))``, default 300).

Every model is fused in one process, one after another, as a batch run or a test suite would.

::

    python benchmarks/golden.py export /tmp/golden-corpus
    python benchmarks/golden.py digest /tmp/golden-corpus -o before.json
    ... refactor ...
    python benchmarks/golden.py digest /tmp/golden-corpus -o after.json
    python benchmarks/golden.py compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]  # the checkout and its test architectures

_REAL = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnx-fuse-test-models"
POLICIES = ("cost", "always")


def export(folder: Path, random_count: int) -> None:
    """Write the corpus into ``folder`` (one ``.onnx`` per model)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((_ROOT / "models").glob("*.onnx")):
        shutil.copyfile(path, folder / f"models-{path.name}")
    for path in sorted((_ROOT / "models" / "producers").glob("*.onnx")):
        shutil.copyfile(path, folder / f"producers-{path.name}")
    for path in sorted(_REAL.glob("*/*.onnx")):
        shutil.copyfile(path, folder / f"real-{path.name}")
    _export_random(folder, random_count)
    _export_archs(folder)
    _export_language(folder)


def _export_random(folder: Path, count: int) -> None:
    from fusion.random_structures import RngChoices, generate

    for i in range(count):
        case = generate(RngChoices(0, i))
        (folder / f"random-{i:04d}.onnx").write_bytes(case.model.SerializeToString())


def _export_archs(folder: Path) -> None:
    from archs import reparam, vision
    from archs.export import export_onnx

    registries = {
        "vision-block": vision.BLOCKS,
        "vision-net": vision.NETWORKS,
        "reparam-block": reparam.BLOCKS,
        "reparam-net": reparam.NETWORKS,
    }
    for prefix, registry in registries.items():
        for name, build in registry.items():
            for exporter, dynamo in (("legacy", False), ("dynamo", True)):
                case = build()
                path = folder / f"{prefix}-{name}-{exporter}.onnx"
                try:
                    export_onnx(case.module, case.args, path, dynamo=dynamo)
                except Exception as e:  # an exporter that cannot: not part of the corpus
                    print(f"skipped {path.name}: {type(e).__name__}: {e}"[:200], file=sys.stderr)


def _export_language(folder: Path) -> None:
    from archs import language

    with tempfile.TemporaryDirectory() as tmp:
        for name in language.MODELS:
            for exporter, dynamo in (("legacy", False), ("dynamo", True)):
                path = Path(tmp) / f"lm-{name}-{exporter}.onnx"
                try:
                    language.export_lm(language.build(name), path, dynamo=dynamo)
                except language.ExporterCannot as e:
                    print(f"skipped {path.name}: {e}"[:200], file=sys.stderr)
                    continue
                shutil.copyfile(path, folder / path.name)


def digest(folder: Path) -> dict[str, dict[str, object]]:
    """``{model/policy: {"sha256": ..., "report": ...}}`` for every model of ``folder``."""
    import onnx_ir as ir

    from converter.fusion.passes import fuse_model
    from converter.model_io import files

    logging.disable(logging.WARNING)
    out: dict[str, dict[str, object]] = {}
    for path in sorted(folder.glob("*.onnx")):
        for policy in POLICIES:
            model = files.load_model(path)
            report = fuse_model(model, policy=policy)
            data = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
            summary = report.to_dict()
            summary.pop("seconds", None)
            out[f"{path.name}/{policy}"] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "report": summary,
            }
    return out


def compare(before: dict, after: dict) -> int:
    """Print what differs between two digests; return how many entries differ."""
    differ = 0
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        differ += 1
        if a is None or b is None:
            print(f"{key}: only in {'after' if a is None else 'before'}")
            continue
        if a["sha256"] != b["sha256"]:
            print(f"{key}: fused model bytes differ")
        for field in sorted(set(a["report"]) | set(b["report"])):
            x, y = a["report"].get(field), b["report"].get(field)
            if x != y:
                print(f"{key}: report.{field} differs:\n  before {x}\n  after  {y}"[:2000])
    total = len(set(before) | set(after))
    print(f"{total - differ} of {total} model/policy digests identical")
    return differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the corpus into a folder")
    p.add_argument("folder", type=Path)
    p.add_argument("--random", type=int, default=300, help="seeded random graphs (default 300)")
    p = sub.add_parser("digest", help="fuse every model of the corpus, write the digests")
    p.add_argument("folder", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p = sub.add_parser("compare", help="compare two digest files")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.folder, args.random)
        print(f"{len(list(args.folder.glob('*.onnx')))} models in {args.folder}")
        return 0
    if args.command == "digest":
        found = digest(args.folder)
        args.output.write_text(json.dumps(found, indent=1, sort_keys=True))
        print(f"{len(found)} model/policy digests written to {args.output}")
        return 0
    before = json.loads(args.before.read_text())
    after = json.loads(args.after.read_text())
    return 1 if compare(before, after) else 0


if __name__ == "__main__":
    sys.exit(main())
