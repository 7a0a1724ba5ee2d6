"""Several ranks on one GPU: the multi-GPU layouts trained for real where only one GPU is lent.

    python3 benchmarks/multi_rank.py --out OUT.json             # one GPU; benchmarks/gpu_validation.py runs it
    python3 benchmarks/multi_rank.py --dry --out OUT.json       # the same logic on CPU ranks (gloo)

NCCL refuses two ranks on one GPU of one host. At init it compares every rank's host hash and the PCI bus id of
its GPU, and two ranks with both equal stop it: "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device
..." (src/init.cc, NCCL 2.27 to 2.29). The host hash is that of the hostname and the boot id, or of NCCL_HOSTID
where that is set (src/misc/utils.cc). So each rank here gets an NCCL_HOSTID of its own: NCCL takes the ranks for
two hosts and joins them as it joins nodes, through its network transport, here its sockets over the loopback
interface (NCCL_SOCKET_IFNAME=lo; NCCL_IB_DISABLE=1 keeps it off the machine's InfiniBand adapters, if any, and
NCCL_MNNVL_ENABLE=0 and NCCL_NVLS_ENABLE=0 off the NVLink fabric features a two-host layout would probe). Its
shared-memory and peer-to-peer transports, which serve ranks of one host, are never considered then;
NCCL_SHM_DISABLE=1 and NCCL_P2P_DISABLE=1 say so. Slow, but every collective that megatron-core and Transformer
Engine make runs as it would between GPUs. Both ranks use device 0 (parallel.cuda_device: one visible GPU).

The layouts, each trained a few steps of a tiny model (the toy preset) from one checkpoint, stopped half way and
resumed (a save and a load at that layout), then compared step by step with one process from the same
checkpoint:

    tp2-te-sp    TP=2, Transformer Engine's layers, sequence parallelism
    cp2-te       CP=2, Transformer Engine's attention (its p2p ring)
    cp2-local    CP=2, megarope's own attention (the local backend; K/V all-gathered, PyTorch's fused kernels)
    dp2          DP=2, megatron's distributed optimizer (its state sharded over the two ranks)
    pp2          PP=2, megatron's 1F1B pipeline schedule

all in bf16, what GPUs train in. The tolerance is the CPU tests' (tests/test_train.py, 1e-5) plus twice the gap
between one process's bf16 and fp32 losses, measured in the same run for each backend: a bf16 run is within that
gap of the exact one, so two bf16 runs are within twice it of each other. A layout that NCCL or Transformer Engine
refuses is skipped, with their exact message; any other error, a missing step or a loss outside the tolerance
fails it. Budget: about two minutes on one H100 (one process for the references and two for the layouts, at
once). --dry: CPU ranks over gloo (MEGAROPE_DEVICE=cpu), the local backend, fp32 layouts, two steps.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import sys
import traceback

LAYOUT_TOL = 1e-5  # the CPU tests' (tests/test_train.py)
LAYOUTS = {  # name: (backend, config overrides)
    "tp2-te-sp": ("te", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "cp2-te": ("te", ["parallel.cp=2"]),
    "cp2-local": ("local", ["parallel.cp=2"]),
    "dp2": ("te", []),
    "pp2": ("te", ["parallel.pp=2"]),
}
SIZES = {False: {"steps": 4, "seq_len": 256}, True: {"steps": 2, "seq_len": 64}}  # GPU, --dry
LAYOUTS_FILE = "layouts.jsonl"


def rank_environment(rank: int) -> dict[str, str]:
    """What rank ``rank`` needs for NCCL to take it for a host of its own (see the module docstring)."""
    return {"NCCL_HOSTID": f"megarope-rank-{rank}", "NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo",
            "NCCL_IB_DISABLE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_MNNVL_ENABLE": "0",
            "NCCL_NVLS_ENABLE": "0"}


def tolerance(dtype: str, gap: float | None) -> float | None:
    """How far a layout's loss may be from one process's: the CPU tests' tolerance, plus twice the measured
    bf16/fp32 gap of one process for bf16 (None: that gap could not be measured)."""
    if dtype != "bf16":
        return LAYOUT_TOL
    return None if gap is None else LAYOUT_TOL + 2 * gap


def refused_by(error: str) -> str | None:
    """"NCCL" when the error ``error`` ends in (a traceback, or a rank's stderr) names NCCL, "Transformer Engine"
    when its innermost frame is in Transformer Engine's code; None for anything else."""
    frames = re.findall(r'File "([^"]+)"', error)
    tail = error[error.rfind('File "'):] if frames else error  # the innermost frame and the error itself
    if re.search(r"nccl", tail, re.IGNORECASE):
        return "NCCL"
    return "Transformer Engine" if frames and "transformer_engine" in frames[-1] else None


def error_message(error: str) -> str:
    """The message of the error ``error`` ends in, on one line: the last exception of a traceback, all its lines
    (an NCCL error ends in NCCL's own "Last error: ..."), else the last line of the output; 500 characters."""
    lines = [line.rstrip() for line in error.strip().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    message = lines[starts[-1]:] if starts else lines[-1:] or ["no output"]
    return " / ".join(line.strip() for line in message)[:500]


def layout_backend(backend: str, dry: bool) -> str:
    return "local" if dry else backend


def dtype_of(dry: bool) -> str:
    return "fp32" if dry else "bf16"


# ----------------------------------------------------------------------------------------------- children
def run_config(work: str, name: str, backend: str, dtype: str, dry: bool, overrides=(), exit_at_step=None,
               cache: str = "references"):
    """A few steps of the toy preset from the shared checkpoint, on the shared corpus (each child its own index
    cache: megatron writes one in place, and the two children start at once)."""
    from megarope import config

    size = SIZES[dry]
    raw = {"model": {"preset": "toy", "backend": backend},
           "train": {"steps": size["steps"], "exit_at_step": exit_at_step, "seq_len": size["seq_len"],
                     "global_batch": 8, "micro_batch": 2, "lr": 3e-3, "warmup_steps": 0, "seed": 11, "dtype": dtype},
           "data": {"path": os.path.join(work, "corpus"), "tokenizer": "bytes", "cache_dir": os.path.join(work, "cache", cache)},
           "init": {"from": os.path.join(work, "start")},
           "checkpoint": {"dir": os.path.join(work, "runs", name), "every": 0, "keep": 1},
           "log": {"tensorboard": False}}
    return config.validate(config.apply_overrides(raw, list(overrides)))


def losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def child_references(work: str, dry: bool) -> dict:
    """One process: the losses of each backend in fp32 and bf16 (the layouts' references, and the gap)."""
    from megarope import parallel, train

    out = {}
    for backend in dict.fromkeys(layout_backend(b, dry) for b, _ in LAYOUTS.values()):
        for dtype in ("fp32", "bf16"):
            key = f"{backend}-{dtype}"
            try:
                train.run(run_config(work, f"one-{key}", backend, dtype, dry), progress=False)
                out[key] = {"losses": losses(os.path.join(work, "runs", f"one-{key}"))}
            except Exception:  # noqa: BLE001 - the error is this reference's result
                out[key] = {"error": traceback.format_exc()}
            parallel.destroy()
    return out


def child_layouts(work: str, dry: bool) -> dict:
    """Two ranks: each layout stopped half way and resumed; rank 0 appends each outcome to layouts.jsonl."""
    import contextlib
    import io

    from megarope import optim, parallel, train

    half = SIZES[dry]["steps"] // 2
    for name, (backend, overrides) in LAYOUTS.items():
        outcome = {"layout": name, "backend": layout_backend(backend, dry), "dtype": dtype_of(dry)}
        if dry and name == "cp2-te":
            outcome["skipped"] = "--dry: no Transformer Engine on a CPU (cp2-local runs the CP path)"
        else:
            try:
                said = io.StringIO()
                for exit_at in (half, None):  # stopped half way, then resumed from that checkpoint
                    with contextlib.redirect_stdout(said):  # rank 0 says where a run starts
                        train.run(run_config(work, name, outcome["backend"], outcome["dtype"], dry, overrides, exit_at,
                                             cache="layouts"), progress=False)
                outcome["losses"] = losses(os.path.join(work, "runs", name))
                outcome["optimizer"] = optim.optimizer_kind()
                resumed = re.search(r"resuming from .* \(step (\d+)\)", said.getvalue())  # the second run's start
                outcome["resumed_from_step"] = int(resumed.group(1)) if resumed else None
            except Exception:  # noqa: BLE001 - the layout's result; the next one may still run
                outcome["error"] = traceback.format_exc()
        if parallel.is_main():
            with open(os.path.join(work, LAYOUTS_FILE), "a") as f:
                f.write(json.dumps(outcome) + "\n")
    parallel.destroy()
    return {"done": True}


# ----------------------------------------------------------------------------------------------- the check
def prepare(work: str) -> None:
    """The corpus (a few stdlib sources as bytes) and the start checkpoint every run loads (made on the CPU)."""
    import sysconfig

    from megarope import checkpoint, compat, data, parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

    os.environ[compat.DEVICE_ENV] = "cpu"  # this process only prepares; the ranks get their own environment
    stdlib = sysconfig.get_paths()["stdlib"]
    with open(os.path.join(work, "docs.jsonl"), "w") as f:
        for name in sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:40]:
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as src:
                f.write(json.dumps({"text": src.read()}) + "\n")
    data.preprocess([os.path.join(work, "docs.jsonl")], "bytes", os.path.join(work, "corpus"))
    parallel.init()
    model = build_model(get_preset("toy"), RopeConfig(base=1e4, train_len=128))
    checkpoint.save_model(model, os.path.join(work, "start"), checkpoint.model_meta(model, tokenizer="bytes"))
    parallel.destroy()


def compare(name: str, outcome: dict | None, references: dict, gaps: dict, steps: int) -> dict:
    """One layout's row: its losses against one process's, or why it did not run."""
    row = {"layout": name}
    if outcome is None:
        return {**row, "status": "error", "reason": "did not run: the ranks stopped before it (see the log)"}
    row.update(backend=outcome["backend"], dtype=outcome["dtype"])
    if "skipped" in outcome:
        return {**row, "status": "skipped", "reason": outcome["skipped"]}
    if "error" in outcome:
        who = refused_by(outcome["error"])
        return {**row, "status": "skipped" if who else "error", "error": outcome["error"][-2000:],
                "reason": (f"{who} refused: " if who else "") + error_message(outcome["error"])}
    reference = references.get(f"{outcome['backend']}-{outcome['dtype']}", {})
    tol = tolerance(outcome["dtype"], gaps.get(outcome["backend"]))
    if "losses" not in reference or tol is None:
        return {**row, "status": "error", "reason": f"no one-process reference: {error_message(reference.get('error', ''))}"}
    got, expected = outcome["losses"], reference["losses"]
    row.update(losses=got, reference=expected, tolerance=tol, optimizer=outcome.get("optimizer"),
               resumed_from_step=outcome.get("resumed_from_step"))
    if len(got) != steps or outcome.get("resumed_from_step") is None:
        return {**row, "status": "fail", "reason": f"{len(got)} of {steps} steps (stopped and resumed: "
                                                   f"{outcome.get('resumed_from_step') is not None})"}
    row["max_abs_diff"] = max(abs(a - b) for a, b in zip(got, expected))
    row["status"] = "pass" if row["max_abs_diff"] <= tol else "fail"
    return row


def check(work: str, dry: bool, result: dict, save, timeout: float = 240) -> None:
    """Run the references and the layouts (at once) and fill ``result`` (rows, gaps, summary, ok, status)."""
    import peak_memory  # benchmarks/, this script's folder: how child ranks are run

    os.makedirs(work, exist_ok=True)
    prepare(work)
    env = {k: v for k, v in os.environ.items() if k not in ("MEGAROPE_DEVICE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", NVTE_ALLOW_NONDETERMINISTIC_ALGO="0",  # TE's attention backward, repeatable
               **({"MEGAROPE_DEVICE": "cpu"} if dry else {}))
    from megarope.config import launch_environment

    layout_env = {**launch_environment(2, 2), **env}  # TP or CP > 1: what the launchers set
    command = [sys.executable, os.path.abspath(__file__), "--work", work] + (["--dry"] if dry else [])
    result.update(environment={"per_rank": rank_environment(0) | {"NCCL_HOSTID": "megarope-rank-<rank>"},
                               **launch_environment(2, 2)}, rows=[])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {what: pool.submit(peak_memory.run_children, command + ["--child", what],
                                  layout_env if what == "layouts" else env, 2 if what == "layouts" else 1, what,
                                  rank_environment, timeout)
                for what in ("references", "layouts")}
        children = {}
        for what, future in runs.items():
            try:
                children[what] = future.result()[0]
            except (SystemExit, Exception) as e:  # noqa: BLE001 - a rank that died or hung: what it said is why
                children[what] = {"error": str(e)}
    references = children["references"] if "error" not in children["references"] else {}
    gaps = {}
    for backend in ("local", "te"):
        fp32, bf16 = references.get(f"{backend}-fp32", {}), references.get(f"{backend}-bf16", {})
        if "losses" in fp32 and "losses" in bf16:
            gaps[backend] = max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"]))
    outcomes = {}
    if os.path.exists(os.path.join(work, LAYOUTS_FILE)):
        with open(os.path.join(work, LAYOUTS_FILE)) as f:
            outcomes = {o["layout"]: o for o in map(json.loads, f)}
    rows = [compare(name, outcomes.get(name), references, gaps, SIZES[dry]["steps"]) for name in LAYOUTS]
    if "error" in children["layouts"]:
        for row in rows:
            if row["status"] == "error" and row["reason"].startswith("did not run"):
                who = refused_by(children["layouts"]["error"])
                row.update(status="skipped" if who else "error", error=children["layouts"]["error"][-2000:],
                           reason=(f"{who} refused: " if who else "the ranks failed: ")
                           + error_message(children["layouts"]["error"]))
    result.update(rows=rows, bf16_fp32_gap=gaps, references={k: v.get("losses") for k, v in references.items()},
                  reference_error=error_message(children["references"]["error"]) if "error" in children["references"]
                  else None)
    statuses = [row["status"] for row in rows]
    result["ok"] = not any(s in ("fail", "error") for s in statuses)
    if "pass" not in statuses and result["ok"]:
        result["status"] = "skipped"  # nothing ran: NCCL or TE refused every layout
    result["summary"] = "; ".join(f"{row['layout']}: {row['status']}" + (
        f" ({row['max_abs_diff']:.2g} <= {row['tolerance']:.2g})" if row["status"] == "pass" else
        f" ({row.get('reason') or row.get('max_abs_diff')})") for row in rows)
    save()


def markdown(check_result: dict) -> list[str]:
    """The check's section of the validation's results.md."""
    gaps = ", ".join(f"{b} {g:.2g}" for b, g in (check_result.get("bf16_fp32_gap") or {}).items()) or "not measured"
    lines = ["", (f"## Several ranks on one GPU (toy preset, 2 ranks, each layout stopped half way and resumed; "
                  f"one-process bf16/fp32 gap: {gaps})"), "",
             "| layout | backend | dtype | status | max abs loss diff | tolerance | note |", "|---|---|---|---|---:|---:|---|"]
    for row in check_result.get("rows", []):
        diff, tol = row.get("max_abs_diff"), row.get("tolerance")
        lines.append(f"| {row['layout']} | {row.get('backend', '')} | {row.get('dtype', '')} | {row['status']} | "
                     f"{'' if diff is None else f'{diff:.3g}'} | {'' if tol is None else f'{tol:.3g}'} | "
                     f"{str(row.get('reason') or row.get('optimizer') or '').replace('|', '/')} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="scratch: corpus, checkpoints, the layouts' outcomes")
    parser.add_argument("--out", help="the result (JSON)")
    parser.add_argument("--dry", action="store_true", help="CPU ranks over gloo, the local backend, fp32")
    parser.add_argument("--child", choices=("references", "layouts"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        run = child_references if args.child == "references" else child_layouts
        print(json.dumps(run(args.work, args.dry)), flush=True)
        return 0
    import tempfile

    work = args.work or tempfile.mkdtemp(prefix="megarope-multi-rank-")
    result = {}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    check(work, args.dry, result, save)
    print(result["summary"])
    return 0 if result["ok"] else 1


if __name__ == "__main__":  # dist_checkpointing and spawn-based helpers need the guard
    sys.exit(main())
