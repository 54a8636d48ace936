"""``pressroom-train``: the training steps (codebooks, LoRA adapters), one subcommand each.

Only commands that exist are listed; each training module registers itself in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# name -> (help, function that adds the subcommand's arguments and sets `func`)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def _eit_args(parser: argparse.ArgumentParser) -> None:
    from pressroom.training.eit import add_args

    add_args(parser)


COMMANDS["eit"] = ("eviction-invariant training (EIT) for AnchorPress: analyze, train", _eit_args)


def _commvq_args(parser: argparse.ArgumentParser) -> None:
    from pressroom.training.commvq import add_arguments

    add_arguments(parser)


COMMANDS["commvq"] = ("CommVQ codebooks: collect KV, scales, key codebooks (EM / E2E), value codecs", _commvq_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pressroom-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args) in sorted(COMMANDS.items()):
        add_args(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        if not COMMANDS:
            print("\nNo training commands are available in this version yet.")
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"pressroom-train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
