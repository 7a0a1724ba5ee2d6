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


# ---------------------------------------------------------------------------- preprocess
def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="tokenize text/JSONL into a megatron indexed dataset (.bin/.idx)")
    p.add_argument("--input", action="append", required=True, metavar="FILE.jsonl|DIR",
                   help="JSONL with a \"text\" field, a plain text file, or a directory of them (repeatable)")
    p.add_argument("--tokenizer", metavar="PATH|bytes", help="a sentencepiece .model, or 'bytes'")
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin and P.idx")
    p.add_argument("--train-tokenizer", type=_positive_int, metavar="VOCAB_SIZE",
                   help="first train a sentencepiece BPE tokenizer on the inputs, to P.tokenizer.model")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="tokenizing processes (default 1)")
    p.set_defaults(run=_run_preprocess)


def _run_preprocess(args) -> None:
    import logging
    import warnings

    if (args.tokenizer is None) == (args.train_tokenizer is None):
        raise UsageError("give exactly one of --tokenizer and --train-tokenizer")
    # importing megatron on a CPU machine logs that there is no CUDA, TE or Apex: noise before our one line
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
        from megarope import data

    s = data.preprocess(args.input, args.tokenizer, args.output_prefix, args.train_tokenizer, args.workers)
    print(f"{s['documents']:,} documents, {s['tokens']:,} tokens (vocab {s['vocab_size']:,}, tokenizer "
          f"{s['tokenizer']}) -> {s['bin']}, {s['idx']}")


# ---------------------------------------------------------------------------- convert
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="HF LLaMA checkpoint <-> megarope checkpoint (megatron dist_checkpointing)",
                       description="--from-hf HF_DIR --to MCORE_DIR [--tp N], or --from-mcore MCORE_DIR --to-hf HF_DIR. "
                                   "The megarope checkpoint loads at any TP/CP layout (dist_checkpointing reshards).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="LLaMA config.json + *.safetensors or pytorch_model*.bin")
    src.add_argument("--from-mcore", metavar="MCORE_DIR", help="a megarope checkpoint directory")
    p.add_argument("--to", metavar="MCORE_DIR", help="megarope checkpoint to write (with --from-hf)")
    p.add_argument("--to-hf", metavar="HF_DIR", help="HF directory to write (with --from-mcore): fp32 model.safetensors")
    p.add_argument("--tp", type=_positive_int, default=1,
                   help="intended TP size: checked against the model's heads/KV heads/FFN and recorded; "
                        "the checkpoint itself loads at any TP/CP (default 1)")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> None:
    from megarope import convert  # imports megatron only once the inputs have been checked

    try:
        if args.from_hf:
            if not args.to or args.to_hf:
                raise UsageError("--from-hf needs --to MCORE_DIR (and no --to-hf)")
            meta = convert.hf_to_mcore(args.from_hf, args.to, args.tp)
            print(f"converted {args.from_hf} -> {args.to} ({meta['preset']['num_layers']} layers, "
                  f"RoPE base {meta['rope']['base']:g}, intended TP {args.tp})")
        else:
            if not args.to_hf or args.to or args.tp != 1:
                raise UsageError("--from-mcore needs --to-hf HF_DIR (and no --to or --tp)")
            cfg = convert.mcore_to_hf(args.from_mcore, args.to_hf)
            print(f"exported {args.from_mcore} -> {args.to_hf} ({cfg['num_hidden_layers']} layers, "
                  f"RoPE base {cfg['rope_theta']:g})")
    finally:
        if "megarope.parallel" in sys.modules:  # a conversion got past validation
            sys.modules["megarope.parallel"].destroy()


# ---------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="continued training with a new RoPE base (megatron-core; torchrun for many ranks)",
                       description="Train as CONFIG.yaml says, with dotted.key=value overrides (values are YAML: "
                                   "1e6, true, null). A checkpoint.dir that holds a checkpoint is resumed. "
                                   "Many ranks: torchrun --nproc-per-node N -m megarope train CONFIG.yaml ...")
    p.add_argument("config", metavar="CONFIG.yaml", help="training config (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. rope.base=1e6 parallel.cp=2")
    p.add_argument("--no-progress", action="store_true", help="print metric lines instead of a progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args) -> None:
    from megarope.config import load_config

    cfg = load_config(args.config, args.overrides)  # bad config: one line, before torch/megatron load
    import logging
    import warnings

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
        from megarope import parallel, train
    try:
        train.run(cfg, progress=False if args.no_progress else None)
    finally:
        parallel.destroy()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megarope", description="RoPE-base scaling laws, continued training and long-context "
                                                  "evaluation on megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_plan(sub)
    _add_preprocess(sub)
    _add_convert(sub)
    _add_train(sub)
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
