"""The ``agnostic-prefetch`` command: demo, convert, inspect, compute-mean."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agnostic-prefetch",
        description="Shared-memory ring loader for JAX and PyTorch: tools and demo.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    from agnostic_prefetch.caffe.convert import add_commands

    add_commands(commands)
    from agnostic_prefetch._demo import add_command as add_demo

    add_demo(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
