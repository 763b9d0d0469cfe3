"""`fastast` command line: each sub-command lives in its own module under fastast.commands.

A command module defines `register(subparsers)`, which adds its parser and sets `func`. Heavy imports
(torch, fastapi) happen inside the handlers, so `fastast --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from fastast import commands
from fastast.errors import FastASTError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastast", description="FastAST: AST with Token Merging, served fast.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastASTError as exc:
        print(f"fastast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
