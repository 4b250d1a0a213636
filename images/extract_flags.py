#!/usr/bin/env python3
"""Write the long command-line options an installed engine's server accepts.

    python images/extract_flags.py vllm   -o images/vllm/flags-<version>.txt
    python images/extract_flags.py sglang -o images/sglang/flags-<version>.txt

Run it with the Python of the engine's own environment (the venv that has
`vllm` or `sglang` installed). It builds the engine's argparse parser through
the engine's Python API, exactly as the server command builds it, without
starting anything, and lists every option string that begins with `--`
(including `--no-...` negations that argparse.BooleanOptionalAction adds and
`--help`). One-dash short aliases (`-tp`, `-q`, ...) are left out.

vllm:   `vllm serve` = vllm.entrypoints.cli.serve.ServeSubcommand().subparser_init
        (which calls make_arg_parser: FrontendArgs + AsyncEngineArgs.add_cli_args)
sglang: `python -m sglang.launch_server` / `sglang serve` =
        argparse.ArgumentParser(prog="sglang serve") + ServerArgs.add_cli_args
        (what sglang.srt.server_args.prepare_server_args does)

vLLM needs to know its platform while it builds the parser (it instantiates
its config dataclasses for defaults). On a machine without a GPU the script sets
VLLM_TARGET_DEVICE=cpu unless it is already set; the set of options does not
depend on the platform (only the choices of --mm-processor-device do).

The engine must be importable; a GPU is not needed. The header of the output
records the command, the engine's installed version, torch's version and the
date, so a file can be regenerated and compared with `diff`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as md
import os
import platform
import shlex
import sys


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    })


def _vllm_parser() -> tuple[argparse.ArgumentParser, str, list[str]]:
    notes: list[str] = []
    if "VLLM_TARGET_DEVICE" not in os.environ:
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - torch missing or broken: let vllm fail
            has_gpu = True
        if not has_gpu:
            os.environ["VLLM_TARGET_DEVICE"] = "cpu"
            notes.append("no GPU visible: VLLM_TARGET_DEVICE=cpu was set so that "
                         "vLLM's config defaults can be built")
    # arg_utils drops --model when argv holds both "serve" and "--help".
    sys.argv = [sys.argv[0]]
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        from vllm.entrypoints.cli.serve import ServeSubcommand
    except ImportError as exc:  # the serve module pulls in the whole server
        notes.append(f"vllm.entrypoints.cli.serve not importable ({exc}); "
                     "used make_arg_parser directly")
        try:
            from vllm.entrypoints.common.cli_args import make_arg_parser
            source = "vllm.entrypoints.common.cli_args.make_arg_parser"
        except ImportError:  # vLLM before the entrypoints/common move
            from vllm.entrypoints.openai.cli_args import make_arg_parser
            source = "vllm.entrypoints.openai.cli_args.make_arg_parser"
        parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
        return parser, source, notes

    top = FlexibleArgumentParser(prog="vllm")
    subparsers = top.add_subparsers(dest="subparser")
    parser = ServeSubcommand().subparser_init(subparsers)
    return parser, "vllm.entrypoints.cli.serve.ServeSubcommand().subparser_init", notes


def _sglang_parser() -> tuple[argparse.ArgumentParser, str, list[str]]:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    return parser, "sglang.srt.server_args.ServerArgs.add_cli_args", []


ENGINES = {
    "vllm": ("vllm", "vllm serve", _vllm_parser),
    "sglang": ("sglang", "python -m sglang.launch_server", _sglang_parser),
}


def render(engine: str, argv: list[str], extra_notes: list[str] = ()) -> str:
    dist, command, build = ENGINES[engine]
    parser, source, notes = build()
    options = _long_options(parser)
    try:
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        torch_version = "not installed"
    header = [
        f"Long options accepted by `{command}` ({dist}=={md.version(dist)}).",
        "Produced by: python " + " ".join(shlex.quote(a) for a in argv),
        f"Parser built by: {source}",
        f"Environment: Python {platform.python_version()}, torch {torch_version}, "
        f"{platform.system()} {platform.machine()}",
        f"Date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d')}",
        f"{len(options)} options; '--' options only (short aliases and "
        "positionals left out), '--no-X' negations included.",
        *notes,
        *extra_notes,
    ]
    return "".join(f"# {line}\n" for line in header) + "".join(f"{o}\n" for o in options)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", choices=sorted(ENGINES))
    ap.add_argument("-o", "--output", help="file to write (default: stdout)")
    ap.add_argument("--note", action="append", default=[],
                    help="extra header line, e.g. how the environment was built")
    args = ap.parse_args()
    # The command as recorded in the header (--note lines appear below it).
    argv = ["images/extract_flags.py", args.engine]
    if args.output:
        argv += ["-o", args.output]
    text = render(args.engine, argv, args.note)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
