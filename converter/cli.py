"""The ``onnx-fuse`` command: parse, call the API with keyword arguments, map errors to exit codes.

Exit codes: 0 success; 1 validation found a difference (nothing written); 2 bad usage or
unreadable input (one line on stderr); 3 an internal error (a bug in onnx-fuse, never a property
of the input: ``--debug`` shows the traceback);
130 interrupted by Ctrl-C (SIGINT) and 143 stopped by SIGTERM, both after removing any partial
output. With several models the exit code is the worst of theirs. This is the only module that
prints.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from converter import __version__, api, batch, inspection
from converter.equivalence import timing
from converter.errors import ConverterError, InputError
from converter.gcpause import paused_collection
from converter.model_io import files as io
from converter.model_io.progress import ProgressLine

__all__ = ["main"]

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM
PROG = "onnx-fuse"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit 2) instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see {self.prog} --help)")


def _input_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    try:
        if not sep or not name:
            raise ValueError
        return name, [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-shape expects NAME:D1,D2,... with integer dims, got {text!r}"
        ) from None


def _tolerance(text: str) -> tuple[str | None, float]:
    name, sep, value = text.rpartition("=")
    try:
        return (name if sep else None), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"tolerance expects VALUE or OUTPUT=VALUE, got {text!r}"
        ) from None


def _add_validation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation")
    g.add_argument("--inputs", metavar="FILE.npz", help="real inputs, one array per input name")
    g.add_argument(
        "--input-shape",
        metavar="NAME:D1,D2",
        action="append",
        type=_input_shape,
        default=[],
        help="shape of one input (repeatable); other dynamic dims get defaults",
    )
    for flag in ("atol", "rtol"):
        g.add_argument(
            f"--{flag}",
            metavar="[OUTPUT=]VALUE",
            action="append",
            type=_tolerance,
            default=[],
            help=f"{flag} for every output, or for one output (repeatable); default per dtype",
        )
    g.add_argument("--trials", type=int, default=3, help="seeded trials (default 3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first trial (default 0)")
    g.add_argument(
        "--strict",
        action="store_true",
        help="require bit-exact outputs: no tolerance, no float64 acceptance",
    )


def _add_benchmark_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--benchmark",
        action="store_true",
        help="also time both models under onnxruntime (default optimisations) and print the "
        "latency before -> after",
    )
    g.add_argument(
        "--benchmark-threads",
        type=int,
        metavar="N",
        help="intra-op threads of the timed sessions (default 1)",
    )
    g.add_argument(
        "--benchmark-provider",
        metavar="NAME",
        help="onnxruntime execution provider to time with (default CPUExecutionProvider)",
    )


def _benchmark_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    threads, provider = args.benchmark_threads, args.benchmark_provider
    if not args.benchmark:
        if threads is not None or provider is not None:
            raise InputError("--benchmark-threads and --benchmark-provider go with --benchmark")
        return {}
    if threads is not None and threads < 1:
        raise InputError("--benchmark-threads must be at least 1")
    options = timing.BenchmarkOptions(
        threads=1 if threads is None else threads, provider=provider or "CPUExecutionProvider"
    )
    return {"benchmark": options}


def _add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="say what was and was not done")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--debug", action="store_true", help="show tracebacks (for bug reports)")


def _fuse_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Merge chains of linear layers in an ONNX model and prove the result equal. "
        f"'{PROG} check A B' compares two models.",
        epilog="exit codes: 0 success; 1 outputs differ (nothing written); 2 bad usage or input; "
        "3 internal error; 130 Ctrl-C; 143 SIGTERM. "
        f"'{PROG} inspect MODEL' lists the linear ops and what would be merged.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("model", nargs="+", help="the .onnx file(s) to fuse (never modified)")
    p.add_argument(
        "-o",
        "--output",
        help="where to write the result (default MODEL.fused.onnx); a folder for several models",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="several models: fuse N at a time (default 1)"
    )
    p.add_argument(
        "--policy",
        choices=("cost", "always"),
        default="cost",
        help="cost: merge only where it saves multiply-adds (default); always: merge whole chains",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument(
        "--keep-on-fail", action="store_true", help="write the output even if it differs"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument(
        "--external-data",
        metavar="NAME",
        help="write weights to external data file NAME beside the output",
    )
    _add_validation_options(p)
    _add_benchmark_options(p)
    _add_common_options(p)
    return p


def _check_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} check",
        description="Compare the outputs of two models with the same inputs and outputs.",
        epilog="exit codes: 0 all outputs match; 1 some differ; 2 bad usage or input",
    )
    p.add_argument("original")
    p.add_argument("candidate")
    p.add_argument(
        "--match-inputs",
        choices=("name", "position"),
        default="name",
        help="pair the models' inputs by name (default) or by position",
    )
    _add_validation_options(p)
    _add_benchmark_options(p)
    _add_common_options(p)
    return p


def _tolerances(pairs: list[tuple[str | None, float]]) -> float | dict[str, float] | None:
    if not pairs:
        return None
    per_output = {name: value for name, value in pairs if name is not None}
    overall = [value for name, value in pairs if name is None]
    if overall and per_output:
        raise InputError("give tolerances either for every output or per output, not both")
    return overall[-1] if overall else per_output


def _validation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.trials < 1:
        raise InputError("--trials must be at least 1")
    return {
        "inputs": args.inputs,
        "input_shapes": dict(args.input_shape) or None,
        "atol": _tolerances(args.atol),
        "rtol": _tolerances(args.rtol),
        "trials": args.trials,
        "seed": args.seed,
        "strict": args.strict,
    }


def _check_report_path(path: str | None) -> None:
    """Refuse a report path we could not write, before any work is done."""
    if path and not Path(path).resolve().parent.is_dir():
        raise InputError(f"{path}: the report's folder does not exist")


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write the report ({e.strerror})") from None


def _run_fuse(argv: Sequence[str]) -> int:
    args = _fuse_parser().parse_args(argv)
    _configure_logging(args)
    _check_report_path(args.report)
    if len(args.model) > 1:
        return _run_batch(args)
    src = Path(args.model[0])
    dst = _destination(src, args.output)
    show_progress = not args.quiet and sys.stderr.isatty()
    with ProgressLine(enabled=show_progress) as progress:
        report = api.fuse_file(src, dst, progress=progress, **_fuse_kwargs(args))
    if args.report:  # the dict of 10,000 records is not free: only when it is written
        _write_json(args.report, report.to_dict())
    if not args.quiet:
        print("\n".join(report.summary_lines(verbose=args.verbose)))
    return EXIT_OK if report.validated is not False else EXIT_DIFFERENT


def _destination(src: Path, output: str | None) -> Path:
    if output is None:
        return src.with_name(src.stem + ".fused.onnx")
    if output.endswith(os.sep) or Path(output).is_dir():
        return Path(output) / src.name
    return Path(output)


def _fuse_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "policy": args.policy,
        "validate": not args.no_validate,
        "external_data": args.external_data,
        "force": args.force,
        "keep_on_fail": args.keep_on_fail,
        **_validation_kwargs(args),
        **_benchmark_kwargs(args),
    }


def _run_batch(args: argparse.Namespace) -> int:
    """Several models: one row per file, a total, the worst exit code."""
    from tqdm import tqdm  # only batch runs draw a bar

    if args.output is not None and not Path(args.output).is_dir():
        raise InputError(f"{args.output}: with several models, -o must be an existing folder")
    if args.benchmark and args.jobs > 1:
        raise InputError(
            "--benchmark with --jobs N would time each model against the others' work: "
            "use --jobs 1 (files are then benchmarked one after the other)"
        )
    show = not args.quiet and sys.stderr.isatty()
    with tqdm(total=len(args.model), disable=not show, unit="file", file=sys.stderr) as bar:
        result = batch.fuse_files(
            args.model,
            args.output,
            jobs=args.jobs,
            on_done=lambda _: bar.update(),
            **_fuse_kwargs(args),
        )
    _write_json(args.report, result.to_dict())
    if not args.quiet or result.exit_code:
        print("\n".join(_batch_lines(result)))
    return result.exit_code


def _batch_lines(result: batch.BatchReport) -> list[str]:
    rows = [("file", "result", "chains", "linear ops", "MACs/row", "params", "seconds", "detail")]
    for f in result.files:
        r = f.report or {}
        figures = [
            f"{r[k + '_before']:,} -> {r[k + '_after']:,}" if r else "-"
            for k in ("linear_ops", "macs", "params")
        ]
        chains = str(len(r["fusions"])) if r else "-"
        detail = f.error or _detail(r)
        rows.append((f.source, f.status, chains, *figures, f"{f.seconds:.2f}", detail))
    t = result.totals()
    total = [
        f"{t[k + '_before']:,} -> {t[k + '_after']:,}" for k in ("linear_ops", "macs", "params")
    ]
    rows.append(
        (
            f"total: {t['files']} file(s)",
            f"{t['ok']} ok, {t['failed']} failed",
            str(t["chains_merged"]),
            *total,
            "",
            f"exit code {result.exit_code}",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _detail(report: dict[str, Any]) -> str:
    timed = report.get("benchmark")
    latency = f", latency {timed['ratio']:.2f}x" if timed else ""
    if not report["fusions"]:
        return "nothing merged" + latency
    verdict = {True: "validated", False: "validation failed", None: "not validated"}
    return verdict[report["validated"]] + latency


def _run_check(argv: Sequence[str]) -> int:
    args = _check_parser().parse_args(argv)
    _configure_logging(args)
    _check_report_path(args.report)
    result = api.check(
        args.original,
        args.candidate,
        match_inputs=args.match_inputs,
        **_validation_kwargs(args),
        **_benchmark_kwargs(args),
    )
    _write_json(args.report, result.to_dict())
    if not args.quiet or not result.passed:
        print(str(result))
    return EXIT_OK if result.passed else EXIT_DIFFERENT


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} inspect",
        description="List every linear op of a model (form, features, weight layout) and what "
        f"{PROG} would merge, with the reasons. Changes nothing.",
    )
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--weights",
        metavar="OUT.npz",
        help="write each linear op's weight as (in, out) and its bias: NODE.weight, NODE.bias "
        "(a Conv's kernel as stored: (out, in/groups, *kernel))",
    )
    p.add_argument("--fused", action="store_true", help="--weights of the fused model")
    p.add_argument("--policy", choices=("cost", "always"), default="cost")
    p.add_argument("--force", action="store_true", help="overwrite an existing --weights file")
    p.add_argument("--debug", action="store_true", help="show tracebacks (for bug reports)")
    return p


def _run_inspect(argv: Sequence[str]) -> int:
    args = _inspect_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    if args.fused and not args.weights:
        raise InputError("--fused needs --weights OUT.npz")
    found = inspection.inspect_file(args.model, policy=args.policy)
    if args.weights:
        _save_weights(args)
    if args.json:
        print(json.dumps(found.to_dict(), indent=2, default=str))
    else:
        print(inspection.format_table(found, terminal=sys.stdout.isatty()))
    return EXIT_OK


def _save_weights(args: argparse.Namespace) -> None:
    """``--weights``: the arrays of the model (or of the fused model) as an ``.npz``."""
    model = io.load_model(args.model)
    if args.fused:
        api.fuse(model, policy=args.policy)
    arrays = inspection.linear_weights(model)
    dst = Path(args.weights)
    if dst.suffix != ".npz":
        raise InputError(f"{dst}: --weights must name an .npz file")
    if (dst.exists() or dst.is_symlink()) and not (args.force and dst.is_file()):
        raise InputError(f"{dst}: already exists; pass --force to overwrite a regular file")
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, dst)
    except OSError as e:
        raise InputError(f"{dst}: cannot write the weights ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _configure_logging(args: argparse.Namespace) -> None:
    # --verbose adds the report's records to stdout; the library's own log is for --debug.
    level = logging.DEBUG if args.debug else logging.WARNING
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s", stream=sys.stderr)


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """While running, SIGTERM raises like Ctrl-C does, so partial output is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, batch.raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    commands = {"check": _run_check, "inspect": _run_inspect}
    command = commands.get(argv[0]) if argv else None
    try:
        # The collector's passes over a model's graph are pure cost (see converter.gcpause);
        # batch mode collects after each file itself.
        with _sigterm_as_exception(), paused_collection():
            return command(argv[1:]) if command else _run_fuse(argv)
    except ConverterError as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except batch.Terminated:
        print(f"{PROG}: terminated (SIGTERM); nothing written", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as e:
        if debug:
            raise
        print(
            f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} "
            "(rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def run() -> NoReturn:
    """The ``onnx-fuse`` executable: :func:`main`, then exit without the collector's last pass.

    At exit Python collects every cycle still in memory, a second or more after a large model
    (its graph is cyclic garbage by then); freezing hands them to the operating system instead,
    which frees the process's memory at once. Only here, never in :func:`main`, which callers
    (tests, other tools) may run many times in one process.
    """
    gc.disable()  # stays off when main() returns: the process ends here
    code = main()
    gc.freeze()
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
