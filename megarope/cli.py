"""The `megarope` command: one subcommand per job, each a thin layer over a module.

Heavy imports (torch, megatron) happen inside the handlers, so `megarope plan` stays instant.
Bad input of any kind ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from megarope.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2: argparse's own usage dump is noise here
        raise UsageError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _int_list(text: str) -> list[int]:
    return [_positive_int(t) for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------------- plan
def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="which base for which context, and where a base breaks (the scaling law)")
    p.add_argument("--head-dim", type=_positive_int, default=128, help="attention head dimension d (default 128)")
    p.add_argument("--train-len", type=_positive_int, default=4096, help="pretraining length (default 4096)")
    p.add_argument("--tune-len", type=_positive_int, default=None, help="continued-training length (default: --train-len)")
    p.add_argument("--pretrain-base", type=_float, default=10000.0, help="base used in pretraining (default 10000)")
    p.add_argument("--base", type=_float, action="append", default=[], help="a base to assess (repeatable)")
    p.add_argument("--target-len", type=_positive_int, action="append", default=[], help="a target context (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="draw periods and bounds to a PNG")
    p.set_defaults(run=_run_plan)


def _run_plan(args) -> None:
    from megarope import planner

    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot wants a .png path, got {args.plot!r}")
    try:
        plan = planner.make_plan(args.head_dim, args.train_len, args.tune_len, args.base, args.target_len,
                                 args.pretrain_base)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(plan, indent=2) if args.json else planner.format_plan(plan))
    if args.plot:
        planner.plot_plan(plan, args.plot)
        if not args.json:
            print(f"\nplot written to {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megarope", description="RoPE-base scaling laws, continued training and long-context "
                                                  "evaluation on megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_plan(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except UsageError as e:
        print(f"megarope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
