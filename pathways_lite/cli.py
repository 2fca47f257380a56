"""The `pathways-lite` command line: one subcommand per user action, `--json` on data."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any


class CliError(Exception):
    """An error shown to the user as one line, with a non-zero exit."""


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """Print rows as an aligned plain-text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cmd_model_info(args: argparse.Namespace) -> int:
    from pathways_lite.model import estimates
    from pathways_lite.model.config import PalmConfig

    try:
        cfg = PalmConfig.from_preset(args.preset)
    except ValueError as e:
        raise CliError(str(e)) from e
    if args.seq_len <= 0:
        raise CliError(f"--seq-len={args.seq_len} must be a positive integer.")
    info = estimates.model_info(cfg, seq_len=args.seq_len)
    if args.json:
        print_json(info)
        return 0
    rows = [(k, estimates.format_quantity(k, v)) for k, v in info.items()]
    print_table(rows, header=("quantity", "value"))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathways_lite import demo

    return demo.run(steps=args.steps, json_output=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathways-lite",
        description="Single-controller orchestration of distributed JAX training (PaLM).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="model presets and estimates")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    info = model_sub.add_parser("info", help="parameter count, FLOPs per token and memory")
    info.add_argument("--preset", required=True, help="palm-8b, palm-62b, palm-540b, ...")
    info.add_argument("--seq-len", type=int, default=2048, help="sequence length (default 2048)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cmd_model_info)

    demo = sub.add_parser("demo", help="train palm-tiny on the default corpus and sample from it")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as e:
        print(f"pathways-lite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pathways-lite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
