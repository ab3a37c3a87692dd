"""The ``onnx-fuse`` command: parse, call the API with keyword arguments, map errors to exit codes.

Exit codes: 0 success; 1 validation found a difference (nothing written); 2 bad usage or
unreadable input (one line on stderr); 3 an internal error (a bug: ``--debug`` shows the traceback).
This is the only module that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from converter import __version__, api
from converter.equivalence import validate
from converter.errors import ConverterError, InputError
from converter.model_io.progress import ProgressLine

__all__ = ["main"]

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
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
        "3 internal error",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("model", help="the .onnx file to fuse (never modified)")
    p.add_argument("-o", "--output", help="where to write the result (default MODEL.fused.onnx)")
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
    _add_validation_options(p)
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
    src = Path(args.model)
    dst = Path(args.output) if args.output else src.with_name(src.stem + ".fused.onnx")
    show_progress = not args.quiet and sys.stderr.isatty()
    with ProgressLine(enabled=show_progress) as progress:
        report = api.fuse_file(
            src,
            dst,
            policy=args.policy,
            validate=not args.no_validate,
            external_data=args.external_data,
            force=args.force,
            keep_on_fail=args.keep_on_fail,
            progress=progress,
            **_validation_kwargs(args),
        )
    _write_json(args.report, report.to_dict())
    if not args.quiet:
        print("\n".join(report.summary_lines(verbose=args.verbose)))
    return EXIT_OK if report.validated is not False else EXIT_DIFFERENT


def _run_check(argv: Sequence[str]) -> int:
    args = _check_parser().parse_args(argv)
    _configure_logging(args)
    _check_report_path(args.report)
    result = validate.check_equivalence(args.original, args.candidate, **_validation_kwargs(args))
    _write_json(args.report, result.to_dict())
    if not args.quiet or not result.passed:
        print(str(result))
    return EXIT_OK if result.passed else EXIT_DIFFERENT


def _configure_logging(args: argparse.Namespace) -> None:
    # --verbose adds the report's records to stdout; the library's own log is for --debug.
    level = logging.DEBUG if args.debug else logging.WARNING
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0, 1, 2 or 3, see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv[:1] == ["check"]:
            return _run_check(argv[1:])
        return _run_fuse(argv)
    except ConverterError as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(
            f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} "
            "(rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
