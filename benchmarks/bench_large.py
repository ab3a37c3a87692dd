"""Peak memory and wall time of onnx-fuse on two ~2.4 GB models, measured in one run (issue #3).

Two float32 models of ``--layers`` (36) ``Gemm(x, W, b, transB=1)`` layers of ``--width`` (4096)
features on a 2-D input, weights in external data (2.4 GB at full size), are built here with numpy
and onnx_ir, one layer at a time, straight into the data file (never as one giant proto):

* ``nothing.onnx``: a ``Relu`` between every two layers, so nothing merges. Measured:
  ``python -m converter nothing.onnx -o out.onnx`` (validation is skipped when nothing merges)
  against onnx_ir's own ``ir.load`` + ``ir.save(..., external_data=...)`` of the same file.
  Targets: peak RSS < 0.5 GB; wall time <= 1.5x the onnx_ir load+save.
* ``chain.onnx``: one chain of fusable layers. Measured:
  ``python -m converter chain.onnx -o out.onnx --no-validate``. Targets: peak RSS < 1 GB; wall time
  <= I/O time + 1.3x the matmul time, where the I/O time is onnx_ir's load+save of the same file
  and the matmul time is a subprocess doing the ``layers - 1`` float64 products the merge needs
  (each weight read from a ``np.memmap``, cast to float64, multiplied into an accumulator; timed
  inside the subprocess, so without interpreter start-up).

The validated run (``chain.onnx`` without ``--no-validate``: onnxruntime loads both models) is
printed afterwards for information; it is not part of the targets (``--skip-validated`` skips it).

Every measured command runs in a fresh subprocess with this process's environment (BLAS variables
such as ``OPENBLAS_NUM_THREADS`` or ``OPENBLAS_CORETYPE`` included, and printed), so the tool and
its references see the same BLAS. A small wrapper process runs the command and reports its wall
time and ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the kernel's high-water mark of its RSS,
file-backed pages of memory-mapped weights included (a child forked straight from this larger
process would start with this process's RSS as its mark). A thread also samples the command's
``RssAnon``/``RssFile`` from ``/proc`` every 20 ms, to show what the peak is made of. Short commands
run ``--rounds`` times, interleaved with their reference, and the fastest round is kept (the
machine is shared). The files just built are in the page cache, so every command reads warm data;
``os.sync()`` before each command keeps one command's write-back out of the next one's time.
Below 1.8 GB of weights (``--width`` under about 3500) onnx-fuse would write one self-contained file
by default; the scaled-down runs pass ``--external-data`` so that both sides write the same.
The script prints the ratios, asserts nothing and exits 0 (1 if a command fails or the disk is
too small). Big files live in a temporary folder under ``--workdir`` and are deleted at the end
unless ``--keep``. ``--width 2048`` gives a quick run (about 8x fewer multiply-adds, 1/4 the size).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, if not installed

from converter.model_io.files import EXTERNAL_DATA_THRESHOLD_BYTES

CHECKOUT = Path(__file__).resolve().parents[1]  # ``python -m converter`` runs from here
GB = 1e9

NOTHING_RSS_TARGET_GB = 0.5
NOTHING_WALL_TARGET = 1.5  # x onnx_ir load+save
CHAIN_RSS_TARGET_GB = 1.0
CHAIN_MATMUL_FACTOR = 1.3  # wall <= io + 1.3 x matmul

_OPSET = 17
_SAMPLE_SECONDS = 0.02
_BLAS_ENV_PREFIXES = ("OPENBLAS", "OMP_", "MKL_", "BLIS_", "GOTO")

# Runs one command and writes "exit-code wall-seconds children-maxrss-KiB" to argv[1].
_WRAPPER_SNIPPET = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - start
maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as f:
    f.write(f"{code} {wall} {maxrss}")
"""

# onnx_ir's own load+save: the I/O reference.
_IO_SNIPPET = """
import sys
import onnx_ir as ir
model = ir.load(sys.argv[1])
ir.save(model, sys.argv[2], external_data=sys.argv[3])
"""

# The float64 products a merge of the chain needs: W = B1.T @ B2.T @ ... (weights (out, in)).
_MATMUL_SNIPPET = """
import sys, time
import numpy as np
path, layers, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
weights = np.memmap(path, dtype="<f4", mode="r", shape=(layers, width, width))
acc = weights[0].astype(np.float64).T
for i in range(1, layers):
    acc = acc @ weights[i].astype(np.float64).T
print(time.perf_counter() - start)
"""


@dataclasses.dataclass
class Measurement:
    """One command's wall time and memory high-water marks (bytes)."""

    label: str
    wall: float
    peak_rss: int
    peak_anon: int = 0
    peak_file: int = 0
    stdout: str = ""

    @property
    def rss_text(self) -> str:
        return (
            f"{self.peak_rss / GB:.2f} GB (sampled: anon {self.peak_anon / GB:.2f}, "
            f"file-backed {self.peak_file / GB:.2f})"
        )


class CommandFailed(RuntimeError):
    """A measured command exited non-zero; the message carries its log's tail."""


# ------------------------------------------------------------------------- building models


def _build_model(
    folder: Path, name: str, layers: int, width: int, *, relu: bool, seed: int
) -> Path:
    """Write ``name``.onnx and ``name``.onnx.data: ``layers`` Gemm(transB=1) with an inline bias.

    Weights are drawn one layer at a time (``N(0, 1/width)``, so activations keep their scale
    along 36 layers) and written straight into the data file as ``ir.ExternalTensor`` s.
    """
    model_path = folder / f"{name}.onnx"
    data_name = f"{name}.onnx.data"
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", width]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": _OPSET}, name=name)
    current, offset = x, 0
    with open(folder / data_name, "wb") as data:
        for i in range(layers):
            weight = rng.standard_normal((width, width), dtype=np.float32)
            weight *= np.float32(width**-0.5)
            weight.tofile(data)
            tensor = ir.ExternalTensor(
                data_name,
                offset,
                weight.nbytes,
                ir.DataType.FLOAT,
                shape=ir.Shape([width, width]),
                name=f"{i}.weight",
                base_dir=str(folder),
            )
            offset += weight.nbytes
            bias = rng.uniform(-(width**-0.5), width**-0.5, width).astype(np.float32)
            w_value = _initializer(graph, f"{i}.weight", tensor)
            b_value = _initializer(graph, f"{i}.bias", ir.Tensor(bias, name=f"{i}.bias"))
            gemm = ir.node(
                "Gemm", [current, w_value, b_value], attributes={"transB": 1}, name=f"/{i}/Gemm"
            )
            graph.append(gemm)
            current = gemm.outputs[0]
            current.name = f"/{i}/Gemm_output"
            if relu and i < layers - 1:
                act = ir.node("Relu", [current], name=f"/{i}/Relu")
                graph.append(act)
                current = act.outputs[0]
                current.name = f"/{i}/Relu_output"
    current.name = "y"
    current.type = ir.TensorType(ir.DataType.FLOAT)
    current.shape = ir.Shape(["batch", width])
    graph.outputs.append(current)
    ir.save(ir.Model(graph, ir_version=10), model_path)  # external tensors stay where they are
    return model_path


def _initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype))
    value.shape = ir.Shape(list(tensor.shape))
    graph.register_initializer(value)
    return value


# -------------------------------------------------------------------------- measuring


def _sample_rss(wrapper_pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    """Record the largest ``RssAnon`` and ``RssFile`` of the wrapper's child (bytes)."""
    children = f"/proc/{wrapper_pid}/task/{wrapper_pid}/children"
    pid = None
    while not stop.is_set():
        try:
            if pid is None:
                with open(children) as f:
                    pid = int(f.read().split()[0])
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("RssAnon", "RssFile"):
                        peaks[key] = max(peaks.get(key, 0), int(rest.split()[0]) * 1024)
        except IndexError:
            pass  # the child is not started yet
        except (OSError, ValueError):
            return
        stop.wait(_SAMPLE_SECONDS)


def _measure(
    label: str, argv: list[str], log: Path, ok_codes: tuple[int, ...] = (0,)
) -> Measurement:
    """Run ``argv`` under a fresh wrapper process; its wall time and peak RSS.

    The wrapper is a small interpreter, so its child's ``ru_maxrss`` starts near zero: a child
    forked straight from this process would inherit this process's RSS in its high-water mark.
    """
    result = log.with_suffix(".result")
    os.sync()  # the previous command's write-back must not land in this one's time
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER_SNIPPET, str(result), *argv],
            cwd=CHECKOUT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        peaks: dict[str, int] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, peaks, stop), daemon=True)
        sampler.start()
        proc.wait()
        stop.set()
        sampler.join()
    text = log.read_text(errors="replace")
    code, wall, maxrss_kib = result.read_text().split()
    if int(code) not in ok_codes:
        tail = "\n".join(text.splitlines()[-15:])
        raise CommandFailed(f"{label} exited {code}; end of {log}:\n{tail}")
    return Measurement(
        label,
        float(wall),
        int(maxrss_kib) * 1024,  # KiB on Linux
        peaks.get("RssAnon", 0),
        peaks.get("RssFile", 0),
        text,
    )


def _remove_outputs(folder: Path, stem: str) -> None:
    """Delete ``stem``.onnx and its data file so the next command writes afresh."""
    for path in folder.glob(f"{stem}.onnx*"):
        path.unlink()


def _fuse_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    data_bytes = model.with_name(model.name + ".data").stat().st_size
    if data_bytes <= EXTERNAL_DATA_THRESHOLD_BYTES:  # else onnx-fuse writes external data anyway
        extra = (*extra, "--external-data", f"{out.name}.data")
    return [sys.executable, "-m", "converter", str(model), "-o", str(out), *extra]


def _io_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", _IO_SNIPPET, str(model), str(out), f"{out.name}.data"]


def _best_of(
    rounds: int, work: Path, commands: dict[str, list[str]], outputs: dict[str, str]
) -> dict[str, Measurement]:
    """Run each command ``rounds`` times, interleaved; keep the fastest wall, the largest RSS."""
    best: dict[str, Measurement] = {}
    for r in range(rounds):
        for label, argv in commands.items():
            m = _measure(label, argv, work / f"{label}.{r}.log")
            _remove_outputs(work, outputs[label])
            old = best.get(label)
            if old is not None:
                m.wall = min(m.wall, old.wall)
                m.peak_rss = max(m.peak_rss, old.peak_rss)
                m.peak_anon = max(m.peak_anon, old.peak_anon)
                m.peak_file = max(m.peak_file, old.peak_file)
            best[label] = m
    return best


# ---------------------------------------------------------------------------- cases


def _case_nothing(work: Path, model: Path, rounds: int, title: str) -> None:
    runs = _best_of(
        rounds,
        work,
        {
            "io": _io_cmd(model, work / "nothing_io.onnx"),
            "fuse": _fuse_cmd(model, work / "nothing_out.onnx"),
        },
        {"io": "nothing_io", "fuse": "nothing_out"},
    )
    io_run, fuse = runs["io"], runs["fuse"]
    ratio = fuse.wall / io_run.wall
    print(f"nothing to fuse ({title}):")
    print(
        f"  wall {fuse.wall:.1f} s vs onnx_ir load+save {io_run.wall:.1f} s -> ratio "
        f"{ratio:.2f} (target <= {NOTHING_WALL_TARGET}) {_verdict(ratio <= NOTHING_WALL_TARGET)}"
    )
    print(
        f"  peak RSS {fuse.rss_text} (target < {NOTHING_RSS_TARGET_GB} GB) "
        f"{_verdict(fuse.peak_rss < NOTHING_RSS_TARGET_GB * GB)}"
    )
    print(f"  onnx_ir load+save peak RSS {io_run.rss_text}")
    print(f"  onnx-fuse: {_summary(fuse.stdout, 'merged', 'linear ops', 'validation')}")


def _case_chain(work: Path, model: Path, rounds: int, args: argparse.Namespace, title: str) -> None:
    io_run = _best_of(
        rounds, work, {"io": _io_cmd(model, work / "chain_io.onnx")}, {"io": "chain_io"}
    )["io"]
    data = model.with_name(model.name + ".data")
    matmul_cmd = [
        sys.executable,
        "-c",
        _MATMUL_SNIPPET,
        str(data),
        str(args.layers),
        str(args.width),
    ]
    matmul = _measure("matmul", matmul_cmd, work / "matmul.log")
    matmul_seconds = float(matmul.stdout.split()[-1])
    fuse = _measure(
        "fuse", _fuse_cmd(model, work / "chain_out.onnx", "--no-validate"), work / "fuse.log"
    )
    _remove_outputs(work, "chain_out")
    budget = io_run.wall + CHAIN_MATMUL_FACTOR * matmul_seconds
    ratio = fuse.wall / budget
    print(f"chain ({title}):")
    print(
        f"  wall {fuse.wall:.1f} s vs io {io_run.wall:.1f} s + {CHAIN_MATMUL_FACTOR} x matmul "
        f"{matmul_seconds:.1f} s = {budget:.1f} s -> ratio {ratio:.2f} (target <= 1.0) "
        f"{_verdict(ratio <= 1.0)}"
    )
    print(
        f"  peak RSS {fuse.rss_text} (target < {CHAIN_RSS_TARGET_GB:g} GB) "
        f"{_verdict(fuse.peak_rss < CHAIN_RSS_TARGET_GB * GB)}"
    )
    print(
        f"  references: onnx_ir load+save peak RSS {io_run.rss_text}; "
        f"matmul subprocess wall {matmul.wall:.1f} s"
    )
    print(f"  onnx-fuse: {_summary(fuse.stdout, 'merged', 'linear ops', 'validation')}")
    if not args.skip_validated:
        validated = _measure(
            "validated",
            _fuse_cmd(model, work / "chain_val.onnx"),
            work / "validated.log",
            ok_codes=(0, 1),  # 1: outputs differ beyond the tolerances, nothing written
        )
        _remove_outputs(work, "chain_val")
        weights = args.layers * args.width * args.width * 4
        anon = validated.peak_anon / weights
        print(
            f"  validated run (information only, not a target): wall {validated.wall:.1f} s, "
            f"peak RSS {validated.rss_text}; {_summary(validated.stdout, 'validation')}\n"
            f"  validated run anonymous memory {validated.peak_anon / GB:.2f} GB = {anon:.2f}x "
            f"the weight bytes (target < 0.5x) {_verdict(anon < 0.5)}"
        )


def _summary(text: str, *keys: str) -> str:
    """The lines of onnx-fuse's summary that start with ``keys``, joined on one line."""
    lines = [line.strip() for line in text.splitlines()]
    picked = [line.split(":")[0] for line in lines if line.startswith(keys)]
    return "; ".join(" ".join(line.split()) for line in picked) or "no summary (see the log)"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


# ------------------------------------------------------------------------------ main


def _environment_line() -> str:
    blas = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(_BLAS_ENV_PREFIXES)]
    cpus = len(os.sched_getaffinity(0))
    return (
        f"{cpus} CPUs, numpy {np.__version__}, onnx_ir {ir.__version__}; "
        f"BLAS environment (same for the tool and every reference): {' '.join(blas) or 'none set'}"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, help="folder for the temporary files (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the models and outputs")
    p.add_argument("--width", "--scale", type=int, default=4096, help="features per layer")
    p.add_argument("--layers", type=int, default=36, help="Gemm layers per model")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the short commands")
    p.add_argument("--skip-validated", action="store_true", help="skip the informational run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    model_bytes = args.layers * args.width * args.width * 4
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    needed = 4 * model_bytes + 2**30  # two models + two outputs at once
    free = shutil.disk_usage(parent).free
    if free < needed:
        print(f"{parent}: {free / GB:.1f} GB free, need {needed / GB:.1f} GB", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench_large-", dir=parent))
    title = f"{args.layers} x {args.width}x{args.width} float32, {model_bytes / GB:.2f} GB"
    print(_environment_line())
    try:
        start = time.perf_counter()
        nothing = _build_model(work, "nothing", args.layers, args.width, relu=True, seed=1)
        chain = _build_model(work, "chain", args.layers, args.width, relu=False, seed=2)
        os.sync()  # let write-back finish before anything is timed
        print(f"built two models in {work} ({time.perf_counter() - start:.0f} s)")
        _case_nothing(work, nothing, args.rounds, title)
        _case_chain(work, chain, args.rounds, args, title)
    except CommandFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
