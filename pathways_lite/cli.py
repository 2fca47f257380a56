"""The `pathways-lite` command line: one subcommand per user action, `--json` on data.

Human output is aligned tables; `--json` prints one JSON document (`logs --json`, which can
follow: one JSON object per record, one per line, as they come); every error is one line
on stderr with a non-zero exit, never a traceback. This module is the entry point (the parser,
`main`, the model and demo commands); the commands that talk to a cluster are in
cli_cluster.py. Importing it loads neither JAX nor the controller's server code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pathways_lite.cli_cluster import add_cluster_commands
from pathways_lite.cli_common import CliError, print_json, print_table


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
    if args.lifecycle:
        from pathways_lite import demo_lifecycle

        return demo_lifecycle.run(json_output=args.json)
    from pathways_lite import demo

    return demo.run(steps=args.steps, json_output=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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

    demo = sub.add_parser(
        "demo",
        help="train two PaLM models at once on two shared local islands and sample from both",
    )
    demo.add_argument("--steps", type=int, default=120, help="steps of each job (default 120)")
    demo.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    demo.add_argument(
        "--lifecycle",
        action="store_true",
        help="instead: pre-train on a mixture, fine-tune on the docstring task, evaluate both "
        "0- and 3-shot (one chain of jobs), print a table",
    )
    demo.set_defaults(func=_cmd_demo)
    add_cluster_commands(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (argparse prints the usage first)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


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
    except BrokenPipeError:  # `pathways-lite jobs | head`: the reader has what it wanted
        from pathways_lite.cli_jobs import quiet_stdout

        quiet_stdout()
        return 0
    except Exception as e:  # SpecError, ClientError, ClusterError...: one line, no traceback
        message = " ".join(str(getattr(e, "message", None) or e).split()) or type(e).__name__
        print(f"pathways-lite: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
