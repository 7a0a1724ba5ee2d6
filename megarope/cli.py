"""The `megarope` command: one subcommand per job, each a thin layer over a module.

Heavy imports (torch, megatron) happen inside the handlers, so `megarope plan` stays instant.
Bad input of any kind ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


# ---------------------------------------------------------------------------- plan
def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="which base for which context, and where a base breaks (the scaling law)",
                       description="The scaling law for a head dimension, pretraining and tuning length and base. "
                                   "--from CHECKPOINT (a megarope checkpoint, a training run or an HF model "
                                   "directory) takes them from its lineage; flags given as well win.")
    p.add_argument("--from", dest="source", metavar="CHECKPOINT|HF_DIR",
                   help="take head dim, rotary share, pretraining base and length, tune length and base from it")
    p.add_argument("--head-dim", type=_positive_int, help="attention head dimension (default 128)")
    p.add_argument("--rotary-percent", type=_float, help="share of each head that rotates (default 1)")
    p.add_argument("--train-len", type=_positive_int, help="pretraining length (default 4096)")
    p.add_argument("--tune-len", type=_positive_int, help="continued-training length (default: --train-len)")
    p.add_argument("--pretrain-base", type=_float, help="base used in pretraining (default 10000)")
    p.add_argument("--base", type=_float, action="append", default=[],
                   help="a base to assess (repeatable; with --from, default: its base)")
    p.add_argument("--target-len", type=_positive_int, action="append", default=[], help="a target context (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="draw periods and bounds to a PNG")
    p.set_defaults(run=_run_plan)


def _plan_source(path: str) -> tuple[dict, dict]:
    """(defaults for the plan's numbers, the lineage as a dict) of a checkpoint, training run or HF directory."""
    import os

    from megarope import lineage

    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "megarope.json")):
        from megarope import convert

        cfg = convert.read_hf_config(path)
        _, preset, rope = convert.hf_fields(cfg)
        meta = {"preset": preset, "rope": rope, "source": "hf", "hf_config": cfg}
    else:
        from megarope import checkpoint  # imports torch: only for --from a checkpoint

        directory = path if os.path.isfile(os.path.join(path, checkpoint.META)) else checkpoint.latest_checkpoint(path)
        if directory is None:
            raise UsageError(f"--from {path}: neither a megarope checkpoint, a training run nor an HF model directory")
        meta = checkpoint.read_meta(directory)
    lin = lineage.lineage_of(meta)
    preset = meta["preset"]
    defaults = {"head_dim": preset.get("kv_channels") or preset["hidden_size"] // preset["num_heads"],
                "rotary_percent": float(meta["rope"].get("rotary_percent", 1.0)), "train_len": lin.pretrain_len,
                "tune_len": lin.effective_tune_len, "pretrain_base": lin.pretrain_base, "base": [meta["rope"]["base"]]}
    return defaults, lin.to_dict()


def _run_plan(args) -> None:
    from megarope import planner

    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot wants a .png path, got {args.plot!r}")
    defaults = {"head_dim": 128, "rotary_percent": 1.0, "train_len": 4096, "tune_len": None, "pretrain_base": 10000.0,
                "base": []}
    lineage = None
    if args.source:
        found, lineage = _plan_source(args.source)
        defaults.update(found)
    given = {k: getattr(args, k) for k in defaults if getattr(args, k) not in (None, [])}
    values = {**defaults, **given}
    try:
        plan = planner.make_plan(values["head_dim"], values["train_len"], values["tune_len"], values["base"],
                                 args.target_len, values["pretrain_base"], values["rotary_percent"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if lineage is not None:
        plan = {"from": args.source, "lineage": lineage, **plan}
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
    p.add_argument("--tokenizer", metavar="PATH|DIR|bytes",
                   help="a sentencepiece .model, an HF tokenizer directory (tokenizer.json / tokenizer_config.json), "
                        "or 'bytes'")
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin and P.idx")
    p.add_argument("--train-tokenizer", type=_positive_int, metavar="VOCAB_SIZE",
                   help="first train a sentencepiece BPE tokenizer on the inputs, to P.tokenizer.model")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="tokenizing processes (default 1)")
    p.set_defaults(run=_run_preprocess)


def _run_preprocess(args) -> None:
    if (args.tokenizer is None) == (args.train_tokenizer is None):
        raise UsageError("give exactly one of --tokenizer and --train-tokenizer")
    from megarope import data

    s = data.preprocess(args.input, args.tokenizer, args.output_prefix, args.train_tokenizer, args.workers)
    print(f"{s['documents']:,} documents, {s['tokens']:,} tokens (vocab {s['vocab_size']:,}, tokenizer "
          f"{s['tokenizer']}) -> {s['bin']}, {s['idx']}")


# ---------------------------------------------------------------------------- convert
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="HF llama/mistral/qwen2 checkpoint <-> megarope checkpoint (dist_checkpointing)",
                       description="--from-hf HF_DIR --to MCORE_DIR [--tp N], or --from-mcore MCORE_DIR --to-hf HF_DIR. "
                                   "Families: llama (Llama-2, Llama-3.x), mistral, qwen2. The megarope checkpoint "
                                   "loads at any TP/CP layout (dist_checkpointing reshards) and carries the "
                                   "tokenizer and the pretraining lineage the scaling law needs.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="config.json + *.safetensors or pytorch_model*.bin")
    src.add_argument("--from-mcore", metavar="MCORE_DIR", help="a megarope checkpoint directory")
    p.add_argument("--to", metavar="MCORE_DIR", help="megarope checkpoint to write (with --from-hf)")
    p.add_argument("--to-hf", metavar="HF_DIR", help="HF directory to write (with --from-mcore): fp32 model.safetensors")
    p.add_argument("--tp", type=_positive_int, default=1,
                   help="intended TP size: checked against the model's heads/KV heads/FFN and recorded; "
                        "the checkpoint itself loads at any TP/CP (default 1)")
    p.add_argument("--tokenizer", metavar="PATH|DIR|bytes",
                   help="the tokenizer to carry (default: HF_DIR's own tokenizer.json/tokenizer_config.json or "
                        "tokenizer.model)")
    p.add_argument("--pretrain-base", type=_float, metavar="B",
                   help="the RoPE base the model was pretrained with (default: config.json's rope_theta)")
    p.add_argument("--pretrain-len", type=_positive_int, metavar="T",
                   help="its pretraining length (default: original_max_position_embeddings, else "
                        "max_position_embeddings)")
    p.add_argument("--tune-len", type=_positive_int, metavar="T",
                   help="the length it was last trained at (default: max_position_embeddings)")
    _add_trust(p, "with --from-mcore: ")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> None:
    from megarope import convert  # imports megatron only once the inputs have been checked

    lineage_flags = {"pretrain_base": args.pretrain_base, "pretrain_len": args.pretrain_len, "tune_len": args.tune_len}
    try:
        if args.from_hf:
            if not args.to or args.to_hf or args.trust_checkpoint:
                raise UsageError("--from-hf needs --to MCORE_DIR (and no --to-hf, no --trust-checkpoint: "
                                 "HF weights load without pickle's code execution)")
            meta = convert.hf_to_mcore(args.from_hf, args.to, args.tp, args.tokenizer, **lineage_flags)
            print(f"converted {args.from_hf} -> {args.to} (intended TP {args.tp})")
            print(convert.describe_conversion(meta))
        else:
            if not args.to_hf or args.to or args.tp != 1 or args.tokenizer or any(lineage_flags.values()):
                raise UsageError("--from-mcore needs --to-hf HF_DIR (and none of --to, --tp, --tokenizer, "
                                 "--pretrain-*, --tune-len)")
            cfg = convert.mcore_to_hf(args.from_mcore, args.to_hf, _trust(args))
            print(f"exported {args.from_mcore} -> {args.to_hf} ({cfg['model_type']}, {cfg['num_hidden_layers']} "
                  f"layers, RoPE base {cfg['rope_theta']:g}, rope_type {cfg['rope_parameters']['rope_type']}, "
                  f"tie_word_embeddings {str(cfg['tie_word_embeddings']).lower()})")
    finally:
        if "megarope.parallel" in sys.modules:  # a conversion got past validation
            sys.modules["megarope.parallel"].destroy()


def _add_trust(p, scope: str = "") -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help=f"{scope}load a megarope checkpoint even where that unpickles data that can run code (FP8 "
                        f"delayed scaling's state, anything beyond tensors and checkpoint metadata): only for a "
                        f"checkpoint from a source you trust (see README, Security)")


def _trust(args):
    from megarope.trust import chosen

    return chosen(args.trust_checkpoint)


# ---------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="continued training with a new RoPE base (megatron-core; torchrun for many ranks)",
                       description="Train as CONFIG.yaml says, with dotted.key=value overrides (values are YAML: "
                                   "1e6, true, null). A checkpoint.dir that holds a checkpoint is resumed. "
                                   "Many ranks: torchrun --nproc-per-node N -m megarope train CONFIG.yaml ...")
    p.add_argument("config", metavar="CONFIG.yaml", help="training config (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. rope.base=1e6 parallel.cp=2")
    p.add_argument("--no-progress", action="store_true", help="print metric lines instead of a progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print the layout, parameters per rank and estimated memory per GPU of the GPU run, without "
                        "building anything; exit 2 when it does not fit parallel.gpu_memory_gb")
    p.add_argument("--world", type=_positive_int, metavar="GPUS",
                   help="with --dry-run: the job's GPU count (default: WORLD_SIZE, else TP x CP x PP)")
    p.set_defaults(run=_run_train)


def _run_train(args) -> None:
    from megarope.config import load_config

    cfg = load_config(args.config, args.overrides)  # bad config: one line, before torch/megatron load
    from megarope import parallel, preflight, train

    if _dry_run(args, preflight.dry_run, cfg):
        return
    try:
        train.run(cfg, progress=False if args.no_progress else None)
    finally:
        parallel.destroy()


def _dry_run(args, dry_run, cfg) -> bool:
    """With --dry-run, print ``dry_run(cfg, args.world)``'s report, its refusal (a layout that does not fit)
    becoming the one-line error; whether it was a dry run."""
    if args.world and not args.dry_run:
        raise UsageError("--world is for --dry-run (a real run's world size comes from its launcher)")
    if not args.dry_run:
        return False
    report, refusal = dry_run(cfg, args.world)
    print(report, flush=True)
    if refusal:
        raise UsageError(refusal)
    return True


# ---------------------------------------------------------------------------- eval / passkey
def _length(text: str) -> int:
    """A token count: 4096, 4K (= 4096), 1M (= 1048576), 1e6."""
    from megarope.units import parse_tokens

    try:
        return parse_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _length_list(text: str) -> list[int]:
    return [_length(t) for t in text.split(",") if t.strip()]


def _float_list(text: str) -> list[float]:
    return [_float(t) for t in text.split(",") if t.strip()]


def _add_rope_and_layout(p) -> None:
    p.add_argument("--tokenizer", metavar="PATH|DIR|bytes",
                   help="tokenizer (default: the checkpoint's own); one the checkpoint was not made with is refused")
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--cp", type=_positive_int, default=1, help="context-parallel size: the sequence is split over "
                   "CP ranks (default 1; run under torchrun for more than one rank)")
    p.add_argument("--rope-base", type=_float, metavar="B",
                   help="evaluate at this RoPE base instead of the trained one")
    p.add_argument("--dynamic-ntk", action="store_true", help="dynamic NTK: rescale the base for each length")
    p.add_argument("--log-scale", type=_positive_int, metavar="T_REF",
                   help="log-scaled attention from T_REF (queries x max(1, ln t / ln T_REF))")
    p.add_argument("--no-bos", action="store_true", help="do not put the tokenizer's BOS first")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--backend", choices=("local", "te"), help="default: the checkpoint's (local when TE is absent)")
    p.add_argument("--max-memory", type=_positive_float, metavar="GB",
                   help="refuse, before loading anything, a length whose estimated peak per rank exceeds GB "
                        "(10^9 bytes), and say what would fit")
    p.add_argument("--cp-comm", choices=("auto", "all-gather", "ring"), default="auto",
                   help="how the local backend's context-parallel attention passes K/V: all-gather (all K/V on "
                        "every rank), ring (two ranks' worth at a time), auto (all-gather up to CP 8, ring above, "
                        "or the ring where only it fits --max-memory)")


def _dtype(name):
    import torch

    return {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, loss and accuracy against length (several checkpoints/variants)",
                       description="Evaluate each --checkpoint under each variant on documents truncated at each "
                                   "length (documents shorter than a length are skipped and counted). Writes "
                                   "results.json, results.csv, ppl_vs_length.png and loss_by_position.png to --out, "
                                   "results.json as each (run, length) completes. SIGTERM, SIGINT or SIGUSR1 stops "
                                   "it before the next batch (exit 128 + the signal's number); run the same command "
                                   "to resume at the next unscored (run, length). Many ranks: torchrun "
                                   "--nproc-per-node N -m megarope eval ... (TP x CP x DP); Slurm: sbatch "
                                   "launch/slurm.sbatch eval ...")
    p.add_argument("--checkpoint", action="append", required=True, metavar="DIR",
                   help="a megarope checkpoint, a training run's directory (its latest step), or an HF model "
                        "directory (llama, mistral, qwen2: converted in memory, its own tokenizer); repeatable")
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="FILE",
                   help=".txt (one document), .jsonl with a \"text\" field, or a directory of them")
    p.add_argument("--lengths", type=_length_list, required=True, metavar="L1,L2,...",
                   help="evaluation lengths in tokens, e.g. 4K,8K,16K (each divisible by 2*CP*TP)")
    p.add_argument("--variants", type=lambda t: [v for v in t.split(",") if v.strip()], metavar="V1,V2,...",
                   help="as-trained, dynamic-ntk, log-scaled, base=B, yarn=F (YaRN by F from the trained length), "
                        "or several joined by '+' "
                        "(default: the one --rope-base/--dynamic-ntk/--log-scale describe)")
    _add_rope_and_layout(p)
    p.add_argument("--window", type=_length, metavar="W",
                   help="sliding window: no token is scored with more than W tokens of context")
    p.add_argument("--stride", type=_length, metavar="S", help="sliding window stride (default W/2)")
    p.add_argument("--max-docs", type=_positive_int, metavar="N", help="score at most N documents per length")
    p.add_argument("--bucket0", type=_length, default=128, metavar="L0",
                   help="first position bucket 0-L0, then L0-2L0, 2L0-4L0, ... (default 128)")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="output directory (default runs/eval)")
    _add_trust(p)
    p.set_defaults(run=_run_eval)


def _precheck(args, checkpoints: list[str]) -> None:
    """The bad inputs that need neither torch nor a tokenizer: one line before the heavy imports."""
    import os

    unit = 2 * args.cp * args.tp
    for name, values in (("length", args.lengths), ("window", [getattr(args, "window", None)])):
        for n in values:
            if n is not None and n % unit:
                raise UsageError(f"{name} {n} is not divisible by 2*CP*TP = {unit}")
    for ckpt in checkpoints:
        if not os.path.isdir(ckpt) or not (os.path.isfile(os.path.join(ckpt, "megarope.json"))
                                           or os.path.isfile(os.path.join(ckpt, "config.json"))
                                           or any(n.startswith("step_") for n in os.listdir(ckpt))):
            raise UsageError(f"not a megarope checkpoint (no megarope.json) nor an HF model directory "
                             f"(no config.json): {ckpt}")
    for path in getattr(args, "data", None) or []:
        if not os.path.exists(path):
            raise UsageError(f"--data {path}: not found")


@contextlib.contextmanager
def _one_line_on_stop(command: str):
    """An evaluation a stop signal ended (signals.Stopped): one line (rank 0), and the usual status of a
    process ended by that signal."""
    from megarope import parallel
    from megarope.signals import Stopped

    try:
        yield
    except Stopped as e:
        if parallel.is_main():
            print(f"megarope {command}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None


def _run_eval(args) -> None:
    _precheck(args, args.checkpoint)
    from megarope.eval import perplexity

    with _one_line_on_stop("eval"):  # resume=None: an unfinished evaluation in --out with the same settings goes on
        perplexity.run(args.checkpoint, args.data, args.lengths, args.variants, args.out, tokenizer=args.tokenizer,
                       tp=args.tp, cp=args.cp, rope_base=args.rope_base, dynamic_ntk=args.dynamic_ntk,
                       log_scale_ref=args.log_scale, window=args.window, stride=args.stride, max_docs=args.max_docs,
                       bos=not args.no_bos, bucket0=args.bucket0, backend=args.backend, dtype=_dtype(args.dtype),
                       max_memory=args.max_memory, cp_comm=args.cp_comm, resume=None, trust=_trust(args))


def _add_passkey(sub) -> None:
    p = sub.add_parser("passkey", help="passkey retrieval accuracy by context length and depth (heatmap)",
                       description="Hide a random 5-digit pass key at each depth of filler text of each length and "
                                   "ask for it. Scored teacher-forced: a trial passes when the argmax at every answer "
                                   "token is right (the same verdict as greedy decoding, in one forward pass). "
                                   "passkey.json is written as each length completes. SIGTERM, SIGINT or SIGUSR1 "
                                   "stops it before the next batch (exit 128 + the signal's number); run the same "
                                   "command to resume at the next unscored length.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a megarope checkpoint, a training run's directory, or an HF model directory")
    p.add_argument("--lengths", type=_length_list, required=True, metavar="L1,L2,...",
                   help="prompt lengths in tokens (each divisible by 2*CP*TP)")
    p.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D1,D2,...",
                   help="where the key goes, 0 = start .. 1 = end (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--trials", type=_positive_int, default=5, help="random keys per cell (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    _add_rope_and_layout(p)
    p.add_argument("--out", default="runs/passkey", metavar="DIR", help="output directory (default runs/passkey)")
    _add_trust(p)
    p.set_defaults(run=_run_passkey)


def _run_passkey(args) -> None:
    if any(not 0 <= d <= 1 for d in args.depths):
        raise UsageError(f"depths must be in [0, 1], got {args.depths}")
    _precheck(args, [args.checkpoint])
    from megarope.eval import passkey

    with _one_line_on_stop("passkey"):  # resume: an unfinished run in --out with the same settings goes on
        passkey.run(args.checkpoint, args.lengths, args.depths, args.trials, args.out, tokenizer=args.tokenizer,
                    tp=args.tp, cp=args.cp, rope_base=args.rope_base, dynamic_ntk=args.dynamic_ntk,
                    log_scale_ref=args.log_scale, seed=args.seed, bos=not args.no_bos, backend=args.backend,
                    dtype=_dtype(args.dtype), max_memory=args.max_memory, cp_comm=args.cp_comm, resume=True,
                    trust=_trust(args))


# ---------------------------------------------------------------------------- experiment
def _add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="the paper's experiment on a model: convert, continue per base, evaluate, "
                                          "report",
                       description="Run CONFIG.yaml's experiment (dotted.key=value overrides, as for train): convert "
                                   "the model once with its lineage, continue it at the tuning length with each base, "
                                   "evaluate every (base, variant, length), then write results.json/csv, the plots, "
                                   "summary.json and report.md to its out directory. Each stage is reused on a "
                                   "rerun; SIGTERM, SIGINT or SIGUSR1 stops it where a rerun resumes (exit 128 + the "
                                   "signal's number). Many ranks: torchrun --nproc-per-node N -m megarope experiment "
                                   "CONFIG.yaml. See examples/experiment_smollm2_135m.yaml.")
    p.add_argument("config", metavar="CONFIG.yaml", help="experiment config (see examples/experiment_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. tune.steps=50 out=runs/x")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stages, their tokens and estimated time and memory per GPU, running nothing; "
                        "exit 2 when a stage does not fit parallel.gpu_memory_gb")
    p.add_argument("--world", type=_positive_int, metavar="GPUS",
                   help="with --dry-run: the job's GPU count (default: WORLD_SIZE, else TP x CP x PP)")
    p.add_argument("--no-progress", action="store_true", help="print metric lines instead of progress bars")
    p.set_defaults(run=_run_experiment)


def _run_experiment(args) -> None:
    from megarope import experiment, experiment_config, experiment_plan, parallel

    cfg = experiment_config.load(args.config, args.overrides)  # bad config: one line, before anything runs
    if _dry_run(args, experiment_plan.dry_run, cfg):
        return
    try:
        experiment.run(cfg, progress=False if args.no_progress else None)
    except experiment.Interrupted as e:  # one line (rank 0), and the usual status of a process ended by that signal
        if parallel.is_main():
            print(f"megarope experiment: {e}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None


# ---------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="reproduce the scaling law on a CPU in minutes (what `make demo` runs): "
                                    "the experiment at toy size")
    p.add_argument("--out", default="runs/demo", help="where checkpoints, results and plots go (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="fewer steps and documents: under 5 minutes, noisier")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> None:
    from megarope import demo

    try:
        demo.run(args.out, args.quick)
    except demo.Interrupted as e:  # one line, and the usual status of a process ended by that signal
        print(f"megarope demo: {e}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megarope", description="RoPE-base scaling laws, continued training and long-context "
                                                  "evaluation on megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_plan(sub)
    _add_preprocess(sub)
    _add_convert(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_passkey(sub)
    _add_experiment(sub)
    _add_demo(sub)
    return parser


def launch_check(argv: list[str]) -> int:
    """launch/slurm.sbatch's check of ``megarope train|eval|experiment ARGS`` before any rank starts. Prints two
    lines: the directory whose files show whether the ranks stopped cleanly (train: checkpoint.dir, eval: --out,
    experiment: out), and the environment megatron-core wants for the layout (config.launch_environment). A bad
    command line or config is one line on stderr and status 2."""
    import os

    from megarope import experiment_config
    from megarope.config import launch_environment, load_config

    try:
        args = build_parser().parse_args(argv)
        if args.command == "eval":
            directory, tp, cp = args.out, args.tp, args.cp
        else:
            experiment = args.command == "experiment"
            cfg = (experiment_config.load if experiment else load_config)(args.config, args.overrides)
            directory, tp, cp = (cfg.out if experiment else cfg.checkpoint.dir), cfg.parallel.tp, cfg.parallel.cp
    except UsageError as e:
        print(f"megarope: error: {e}", file=sys.stderr)
        return 2
    print(os.path.abspath(directory))
    print(" ".join(f"{name}={value}" for name, value in launch_environment(tp, cp).items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    from megarope import compat

    compat.quiet()  # megatron's CPU notices would bury the one line a bad input gets
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except UsageError as e:
        print(f"megarope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
