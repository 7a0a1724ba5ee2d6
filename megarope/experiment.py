"""`megarope experiment CONFIG.yaml`: the paper's experiment on a model, as one reproducible command.

"Continue my model at length T with bases B1..Bn for N steps, then show me, per base, perplexity
against length with dynamic NTK and log-scaled attention, the predicted bound beside the measured
break." Stages, each in its own place under ``out``, each checked and reused when a rerun finds it done:

    hf          a GGUF model dequantized into an HF directory (sources.gguf_to_hf)
    model       the megarope checkpoint the runs start from, with the lineage the law needs (convert.hf_to_mcore,
                or a megarope checkpoint saved again under another lineage); a checkpoint that already
                records its lineage is used as it is
    data        the built-in corpus tokenized with the model's own tokenizer (data.stdlib_long_corpus)
    pretrain    training from random weights, when model.preset asks for it (the demo's toy model)
    base-<B>    one continued run per base (train.run, under the same layout options as `megarope train`)
    eval        every (base, variant, length) of eval (eval.perplexity.run); eval-<name>: each of eval.extra
then summary.json (base, predicted bound, measured break) and report.md, a report to paste into a paper
(megarope.report).

A stage is reused when it is complete: a training stage when its checkpoint has every step and was
trained with the same settings from the same checkpoint (else it starts over), and its files are as
its manifest says (checkpoint.verify_checkpoint); a converted model when it records the same source
and lineage; an evaluation when it finished with the same checkpoints (by their manifests), documents
and settings. SIGTERM, SIGINT or SIGUSR1 stops the whole experiment: a training stage saves at the end
of its step, an evaluation stops before its next batch, and a rerun resumes the stage where it stopped
(Interrupted). Under torchrun (or Slurm: launch/slurm.sbatch experiment) every rank runs every stage:
rank 0 does the file work while the others wait, the conversion and the runs are collective.

`megarope demo` is this experiment at toy size (megarope.demo holds its config). The config's schema is
megarope.experiment_config; the dry run, megarope.experiment_plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass

from megarope import config as configuration, lineage as lineages, report, scaling, trust
from megarope.config import TrainSection
from megarope.errors import UsageError
from megarope.experiment_config import EvalGroup, ExperimentConfig, LineageSection, validate
from megarope.files import sha256_file, write_json_atomic, write_text_atomic

TRUST_OPT_IN = "model.trust: true"  # what a refused load of the model source names


# ----------------------------------------------------------------------------------------------- the model
@dataclass
class Model:
    """What the plan knows of the model before any stage runs."""

    kind: str  # "gguf", "hf", "checkpoint" or "preset"
    path: str | None
    name: str
    preset: object  # megarope.model.Preset
    hf_config: dict | None
    lineage: lineages.Lineage
    recorded_lineage: bool  # a megarope checkpoint whose own lineage is the one to use (no convert stage)

    def describe(self) -> str:
        p = self.preset
        n = p.num_params()
        return (f"{self.name}: {p.num_layers} layers, hidden {p.hidden_size}, {p.num_heads} heads x {p.head_dim} "
                f"({p.num_query_groups} KV heads), vocab {p.vocab_size:,}, "
                f"{f'{n / 1e6:,.0f}M' if n >= 1e7 else f'{n:,}'} parameters")


def read_model(cfg: ExperimentConfig) -> Model:
    """The model's shape and lineage from its header or metadata alone (no weights are read), or one line
    saying what is missing: a model without a lineage is refused with the key to give."""
    from megarope import convert, sources
    from megarope.model import Preset, get_preset

    m = cfg.model
    if m.preset:
        p = cfg.pretrain
        this = "the pretrain section (trained from random weights)"
        lin = lineages.Lineage(p.base, p.seq_len, p.seq_len,
                               sources={"pretrain_base": f"{this}'s base", "pretrain_len": f"{this}'s seq_len",
                                        "tune_len": f"{this}'s seq_len"})
        return Model("preset", None, m.preset, get_preset(m.preset), None, lin, False)
    path = sources.locate(m.source, m.package)
    kind = sources.kind_of(path)
    hf_config, meta = None, None
    if kind == "checkpoint":
        from megarope import checkpoint

        path = path if os.path.isfile(os.path.join(path, checkpoint.META)) else checkpoint.latest_checkpoint(path)
        meta = checkpoint.read_meta(path)
        preset = Preset(**meta["preset"])
    else:
        hf_config = sources.gguf_config(path) if kind == "gguf" else convert.read_hf_config(path)
        preset = Preset(**convert.hf_fields(hf_config)[1])
    name = os.path.basename(os.path.normpath(path)) + (f" ({m.package})" if m.package else "")
    if isinstance(m.lineage, LineageSection):
        given = m.lineage
        lin = lineages.Lineage(given.pretrain_base, given.pretrain_len, given.tune_len or given.pretrain_len,
                               sources=dict.fromkeys(lineages.FIELDS, _lineage_source(given)))
        recorded = meta is not None and (meta.get("lineage") or {}).get("pretrain_base") is not None \
            and lineages.lineage_of(meta) == lin
        return Model(kind, path, name, preset, hf_config, lin, recorded)
    if m.lineage == "config.json":
        if hf_config is None:
            raise UsageError(f"model.lineage: config.json takes an HF model's own numbers, and {path} is a megarope "
                             f"checkpoint: leave model.lineage out to use the lineage it records, or give its numbers")
        return Model(kind, path, name, preset, hf_config, lineages.from_hf_config(hf_config), False)
    if meta is not None and meta.get("lineage") and m.lineage is None:
        return Model(kind, path, name, preset, None, lineages.lineage_of(meta), True)
    stated = ""
    if hf_config is not None:
        said = lineages.from_hf_config(hf_config)
        stated = (f", or model.lineage: config.json to take what its config.json says (base "
                  f"{said.pretrain_base:g}, {said.pretrain_len:,} positions) as its pretraining")
    raise UsageError(f"{path} records no lineage, the pretraining the scaling law predicts from: give "
                     f"model.lineage.pretrain_base, .pretrain_len and .tune_len (what `megarope convert "
                     f"--pretrain-base/--pretrain-len/--tune-len` records){stated}")


def _lineage_source(given: LineageSection) -> str:
    return "the experiment config's model.lineage" + (f"; {given.note}" if given.note else "")


def predicted_bound(model: Model, base: float, tune_len: int) -> scaling.BasePlan | None:
    """Theorem 3 for ``base`` tuned at ``tune_len`` (eqs. 13, 16a-16d), from the model's lineage."""
    lin = model.lineage
    try:
        return scaling.plan_base(scaling.rotary_dim(model.preset.head_dim), lin.pretrain_len, base,
                                 max(tune_len, lin.pretrain_len), lin.pretrain_base)
    except ValueError:
        return None


def _eval_dtype_bytes(gpu: bool) -> int:
    return 2 if gpu else 4  # bf16 on a GPU, fp32 on a CPU (eval.runs.default_dtype)


def check_eval_memory(cfg: ExperimentConfig, model: Model, gpu: bool) -> dict[str, str]:
    """Refuse, in one line and before anything runs, an evaluation length whose estimated peak per rank
    exceeds parallel.gpu_memory_gb; returns each group's K/V passing (eval.memory.check_max_memory)."""
    from megarope.eval.memory import check_max_memory

    p = cfg.parallel
    return {label: check_max_memory({label: model.preset}, group.lengths, p.gpu_memory_gb, _eval_dtype_bytes(gpu),
                                    p.tp, p.cp, cfg.eval.cp_comm, limit_name="parallel.gpu_memory_gb")
            for label, group in cfg.groups() if group.enabled}


# ----------------------------------------------------------------------------------------------- signals
class Interrupted(Exception):
    """SIGTERM, SIGINT or SIGUSR1 stopped the experiment. Finished stages are kept; a rerun resumes the stopped one."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; run it again to resume")


class StageSignals:
    """SIGTERM, SIGINT and SIGUSR1 for the whole experiment.

    While a training stage is in its step loop, train's own handler is installed (SIGTERM, SIGUSR1):
    the stage saves at the end of its step and returns, stopped by the signal; a SIGINT is passed on to
    it as a SIGTERM. The evaluation has handlers of its own: it stops before its next batch, keeping the
    results it wrote. Anywhere else nothing is half-done that a save could keep (files are written
    atomically), so a signal raises Interrupted at once, and so does a second one during a stage's save.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.where = "before its first stage"
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._handler = self._handle  # one bound method, so that getsignal can recognise it
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame):
        first = self.received is None
        self.received = self.received or signum
        if first and signal.getsignal(signal.SIGTERM) is not self._handler:  # a stage's step loop has SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Interrupted(signum, self.where)


def _say(message: str = "") -> None:
    from megarope import parallel

    if parallel.is_main():
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------- training stages
def train_config(cfg: ExperimentConfig, name: str, base: float, section: TrainSection | dict, data_prefix: str,
                 init_from: str | None, init_trust: bool | str = "own") -> dict:
    """The `megarope train` config of one training stage, checkpointing to out/<name>; ``init_trust``: "own"
    for an earlier stage of this experiment (megarope.trust), model.trust for the user's checkpoint."""
    train = section.model_dump(include=set(TrainSection.model_fields)) if isinstance(section, TrainSection) \
        else dict(section)
    return {"model": {"preset": cfg.model.preset, "backend": cfg.model.backend},
            "rope": {"base": base, "train_len": train["seq_len"]},
            "parallel": cfg.parallel.model_dump(),
            "train": train,
            "data": {"path": data_prefix, "tokenizer": cfg.model.tokenizer},
            "init": {"from": init_from, "trust": init_trust},
            "checkpoint": {"dir": os.path.join(cfg.out, name), **cfg.checkpoint.model_dump()},
            "log": cfg.log.model_dump()}


def _comparable(cfg: dict) -> dict:
    """What decides a stage's result: the model, RoPE and training settings, the data, and the checkpoint
    it starts from (by real path, so a stage trained from another checkpoint never matches)."""
    start = cfg["init"]["from"]
    data = cfg["data"]
    return {**{key: cfg[key] for key in ("model", "rope", "train")},
            "data": {"path": os.path.realpath(data["path"]) if data.get("path") else None,
                     "tokenizer": data.get("tokenizer")},
            "init": os.path.realpath(start) if start else None}


def train_stage(label: str, cfg: dict, signals: StageSignals, progress: bool | None = None) -> str:
    """Train one stage unless its checkpoint directory already holds it finished; returns its checkpoint."""
    from megarope import checkpoint, parallel, train

    root, steps = cfg["checkpoint"]["dir"], cfg["train"]["steps"]
    found = checkpoint.latest_checkpoint(root)
    start = f"training {steps} steps"
    if found:
        saved = checkpoint.read_train_state(found)
        if _comparable(saved["config"]) != _comparable(configuration.validate(cfg).to_dict()):
            _say(f"[{label}] {root} was trained with other settings or from another checkpoint: starting over")
            parallel.wait_for_all()  # every rank has read it
            if parallel.is_main():
                shutil.rmtree(root)
            parallel.wait_for_all()
        elif saved["step"] >= steps:
            problem = checkpoint.verify_checkpoint(found)
            if problem:
                raise UsageError(f"[{label}] {problem}; delete {root} to train this stage again")
            _say(f"[{label}] cached: {found}")
            return found
        else:
            start = f"resuming at step {saved['step']} of {steps}"
    started = time.perf_counter()
    signals.where = f"in stage {label}"
    _say(f"[{label}] {start}, base {cfg['rope']['base']:g}")
    summary = train.run(cfg, progress=progress)  # a progress bar on a terminal, periodic lines in a log
    if summary["stopped"]:
        raise Interrupted(signals.received or signal.SIGTERM,
                          f"in stage {label} after step {summary['step']} of {steps} (saved {summary['checkpoint']})")
    _say(f"[{label}] done in {time.perf_counter() - started:.0f} s, loss {summary['loss']:.3f}")
    return summary["checkpoint"]


# ----------------------------------------------------------------------------------------------- the model stages
def _rank0_then_all(work):
    """``work()`` on rank 0 while the others wait (failing together), then on every rank: work that is
    done once and found done after that (a stage's cache), so every rank returns the same paths."""
    from megarope import parallel

    first = None
    with parallel.fail_together():
        if parallel.is_main():
            first = work()
    return first if parallel.is_main() else work()


def gguf_stage(model: Model, out: str) -> str:
    """The GGUF file as an HF directory, out/hf (made once, from this very file)."""
    from megarope import sources

    hf_dir = os.path.join(out, "hf")

    def work():
        if sources.hf_dir_matches(hf_dir, model.path):
            return "cached"
        if os.path.exists(hf_dir):
            raise UsageError(f"{hf_dir} was made from another GGUF file; delete it, or give another out")
        sources.gguf_to_hf(model.path, hf_dir)
        return "made"

    _say(f"[hf] {_rank0_then_all(work)}: {hf_dir} (the GGUF dequantized to fp32)")
    return hf_dir


def model_stage(cfg: ExperimentConfig, model: Model, hf_dir: str | None) -> str:
    """The checkpoint the runs start from: the source itself when it records the lineage to use, else
    out/model, converted (or saved again) with that lineage once and verified on every rerun."""
    from megarope import checkpoint, convert

    if model.recorded_lineage:
        return model.path
    target = os.path.join(cfg.out, "model")
    lin = model.lineage
    given = {"pretrain_base": lin.pretrain_base, "pretrain_len": lin.pretrain_len, "tune_len": lin.tune_len} \
        if isinstance(cfg.model.lineage, LineageSection) else {}
    where = _lineage_source(cfg.model.lineage) if given else ""
    if os.path.isfile(os.path.join(target, checkpoint.META)):
        meta = checkpoint.read_meta(target)
        same = lineages.lineage_of(meta) == lin and (
            meta.get("hf_config") == convert.read_hf_config(hf_dir) if hf_dir
            else meta.get("converted_from") == model.path)
        if not same:
            raise UsageError(f"{target} holds another model or lineage than this config's; delete it and the "
                             f"stages trained from it, or give another out")
        problem = checkpoint.verify_checkpoint(target)
        if problem:
            raise UsageError(f"[model] {problem}; delete {target} to convert again")
        _say(f"[model] cached: {target}")
        return target
    _say(f"[model] converting {hf_dir or model.path} -> {target}")
    if hf_dir:
        convert.hf_to_mcore(hf_dir, target, lineage_given_as=where, **given)
    else:  # a megarope checkpoint saved again, recording the lineage the config gives
        from megarope import parallel

        parallel.init()
        source_meta = checkpoint.read_meta(model.path)
        net = checkpoint.build_from_checkpoint(model.path, trust=trust.chosen(cfg.model.trust, TRUST_OPT_IN))
        tokenizer = checkpoint.tokenizer_path(model.path)
        checkpoint.save_model(net, target, {**source_meta, "lineage": lin.to_dict(), "converted_from": model.path},
                              tokenizer_file=tokenizer if tokenizer and os.path.exists(tokenizer) else None)
    return target


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    train_prefix: str
    eval_docs: dict[str, str]  # stage name -> documents
    describe: str


def document_requests(cfg: ExperimentConfig) -> list[tuple[int, int]]:
    """(longest length, documents) of every evaluation, enabled or not: what the corpus holds out, so that
    turning one on later changes no training data."""
    return [(max(group.lengths), group.docs) for _, group in cfg.groups()]


def data_stage(cfg: ExperimentConfig, tokenizer) -> Data:
    """The training prefix and each evaluation's documents; the built-in corpus is prepared once (rank 0)."""
    from megarope import data

    where = cfg.data.dir or os.path.join(cfg.out, "data")
    prefix, eval_docs, what = cfg.data.train, {label: cfg.data.eval for label, _ in cfg.groups()}, "given"
    if cfg.data.train and cfg.data.eval:
        return Data(prefix, eval_docs, what)
    if cfg.data.corpus == "stdlib":
        requests = document_requests(cfg)
        try:
            built, paths = _rank0_then_all(lambda: data.stdlib_long_corpus(where, tokenizer, requests))
        except UsageError as e:
            raise UsageError(f"data.corpus stdlib: {e}; lower eval.docs or the longest eval length, or give "
                             f"data.eval") from None
        held = {label: paths[(max(g.lengths), g.docs)] for label, g in cfg.groups()}
        what = "the standard library's source and documentation; held-out source joined into documents"
    else:
        built = _rank0_then_all(lambda: data.prepare_toy_data(where, tokenizer))
        held = {label: data.stdlib_corpus(where)[1] for label, _ in cfg.groups()}
        what = "the standard library's source; held-out files"
    return Data(prefix or built, {label: cfg.data.eval or held[label] for label, _ in cfg.groups()},
                what if not (cfg.data.train or cfg.data.eval) else "partly given")


def check_documents(cfg: ExperimentConfig, data: Data, tokenizer) -> None:
    """Refuse, before any training, an evaluation whose documents are all shorter than its longest length
    (the documents data.stdlib_long_corpus joins are long enough by construction)."""
    from megarope.data import iter_documents

    for label, group in cfg.groups():
        if not group.enabled or (cfg.data.corpus == "stdlib" and not cfg.data.eval):
            continue
        longest = max(len(tokenizer.encode(text)) + (tokenizer.bos is not None)
                      for text in iter_documents([data.eval_docs[label]]))
        if longest < max(group.lengths):
            raise UsageError(f"{label}: the longest evaluation document ({data.eval_docs[label]}) has {longest:,} "
                             f"tokens with the model's tokenizer, shorter than the longest evaluation length "
                             f"{max(group.lengths):,}")


# ----------------------------------------------------------------------------------------------- evaluation
def _manifest_digest(ckpt: str) -> str | None:
    from megarope import checkpoint

    path = os.path.join(ckpt, checkpoint.MANIFEST)
    return sha256_file(path) if os.path.isfile(path) else None


def _documents_digest(path: str) -> str:
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


EVAL_STAGE = "eval_stage.json"  # in an evaluation's directory: what it evaluated, and whether it finished


def eval_stage(label: str, cfg: ExperimentConfig, group: EvalGroup, checkpoints: list[str], documents: str,
               out_dir: str, cp_comm: str, signals: StageSignals) -> list[dict]:
    """Every (checkpoint, variant, length) of ``group`` (eval.perplexity.run, which resumes an evaluation
    stopped midway); a finished one with the same checkpoints, documents and settings is reused."""
    from megarope import parallel
    from megarope.eval import perplexity, runs
    from megarope.signals import Stopped

    dtype, p = runs.default_dtype(), cfg.parallel
    settings = {"checkpoints": [[c, _manifest_digest(c)] for c in checkpoints], "variants": group.variants,
                "lengths": group.lengths, "documents": _documents_digest(documents), "docs": group.docs,
                "bucket0": cfg.eval.bucket0 or cfg.tune.seq_len, "positions": cfg.eval.positions,
                "backend": cfg.model.backend, "dtype": str(dtype), "tp": p.tp, "cp": p.cp}
    stage_file = os.path.join(out_dir, EVAL_STAGE)
    try:
        with open(stage_file) as f:
            before = json.load(f)
    except (OSError, ValueError):
        before = {}
    parallel.wait_for_all()  # every rank has read it before rank 0 rewrites it
    if cfg.eval.reuse and before == {"settings": settings, "finished": True}:
        names = {f"{lab}:{v}" for lab in runs.checkpoint_labels(checkpoints) for v in _variant_names(group.variants)}
        records = [r for r in perplexity.read_results(out_dir) if r["run"] in names and r["length"] in group.lengths]
        if len(records) == len(names) * len(group.lengths):
            _say(f"[{label}] cached: {out_dir}/results.json")
            return records
    if parallel.is_main():
        if before.get("settings") != settings:  # results of other checkpoints or documents: not this stage's
            for stale in ("results.json", "results.csv", runs.UNFINISHED):
                if os.path.exists(os.path.join(out_dir, stale)):
                    os.remove(os.path.join(out_dir, stale))
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(stage_file, {"settings": settings, "finished": False})
    signals.where = f"in stage {label}" + (" (the trained stages are kept)" if label == "eval" else "")
    models = f"{len(checkpoints)} models" + (f" x {len(group.variants)} variants" if len(group.variants) > 1 else "")
    held = "files" if cfg.data.corpus == "stdlib-files" and not cfg.data.eval else "documents"
    _say(f"[{label}] {models} up to {max(group.lengths)} tokens on {group.docs} held-out {held}")
    started = time.perf_counter()
    parallel.init(tp=p.tp, cp=p.cp)  # the layout eval runs at (a training stage may have left PP)
    try:  # the evaluation handles the stop signals itself: it stops before its next batch
        records = perplexity.run(checkpoints, [documents], group.lengths, group.variants, out_dir, tp=p.tp, cp=p.cp,
                                 max_docs=group.docs, bucket0=settings["bucket0"], positions=cfg.eval.positions,
                                 backend=cfg.model.backend, dtype=dtype, cp_comm=cp_comm, resume=None,
                                 trust=trust.OWN, verbose=False)  # every checkpoint is a stage of this experiment
    except Stopped as e:
        raise Interrupted(getattr(signal, e.signal or "SIGTERM"), signals.where) from None
    if parallel.is_main():
        write_json_atomic(stage_file, {"settings": settings, "finished": True})
    _say(f"[{label}] done in {time.perf_counter() - started:.0f} s")
    return records


def _variant_names(variants: list[str]) -> list[str]:
    from megarope.eval.variants import variants_from_flags

    return [v.name for v in variants_from_flags(variants)]


# ----------------------------------------------------------------------------------------------- the run
def run(cfg: ExperimentConfig | dict, progress: bool | None = None) -> list[dict]:
    """The whole experiment; returns the summary ({base, predicted_bound, measured_break} per base, with
    "measured_breaks" by variant when the main evaluation has several). Raises Interrupted when a stop
    signal ends it (in the main thread; elsewhere signals are left alone), UsageError on bad input."""
    from megarope import parallel

    cfg = cfg if isinstance(cfg, ExperimentConfig) else validate(cfg)
    model = read_model(cfg)
    with StageSignals() as signals:
        try:
            return _run(cfg, model, signals, progress)
        finally:
            parallel.destroy()


def _run(cfg: ExperimentConfig, model: Model, signals: StageSignals, progress: bool | None) -> list[dict]:
    from megarope import checkpoint, compat, data as datasets, parallel
    from megarope.eval import runs

    timings, started = {}, time.perf_counter()
    cp_comm = check_eval_memory(cfg, model, compat.uses_cuda())
    parallel.init()  # the process group every stage shares (torchrun/srun: all ranks)

    def timed(name, stage, *args):
        t = time.perf_counter()
        result = stage(*args)
        timings[name] = time.perf_counter() - t
        runs.free_memory()  # what a stage's model held, before the next one builds its own
        return result

    hf_dir = None
    if model.kind == "gguf":
        signals.where = "in stage hf"
        hf_dir = timed("hf", gguf_stage, model, cfg.out)
    elif model.kind == "hf":
        hf_dir = model.path
    start = None
    if model.kind != "preset":
        signals.where = "in stage model"
        start = timed("model", model_stage, cfg, model, hf_dir)
    signals.where = "while preparing the data"
    t = time.perf_counter()
    spec = cfg.model.tokenizer or checkpoint.tokenizer_path(start)
    if spec is None:
        raise UsageError(f"{start} carries no tokenizer, which the built-in corpus and the evaluation need")
    tokenizer = datasets.load_tokenizer(spec)
    prepared = data_stage(cfg, tokenizer)
    check_documents(cfg, prepared, tokenizer)
    timings["data"] = time.perf_counter() - t
    _say(f"[data] {prepared.train_prefix} ({prepared.describe})")

    if cfg.pretrain is not None:
        start = timed("pretrain", train_stage, "pretrain", train_config(
            cfg, "pretrain", cfg.pretrain.base, cfg.pretrain, prepared.train_prefix, None), signals, progress)
    start_trust = cfg.model.trust if start == model.path else "own"  # the user's checkpoint, or one of ours
    tuned = {}
    for base in cfg.tune.bases:
        name = f"base-{base:g}"
        tuned[base] = timed(name, train_stage, name, train_config(cfg, name, base, cfg.tune, prepared.train_prefix,
                                                                  start, start_trust), signals, progress)
    results = {}
    for label, group in cfg.groups():
        if group.enabled:
            out_dir = cfg.out if label == "eval" else os.path.join(cfg.out, label)
            checkpoints = [tuned[b] for b in group.bases or cfg.tune.bases]
            results[label] = timed(label, eval_stage, label, cfg, group, checkpoints, prepared.eval_docs[label],
                                   out_dir, cp_comm[label], signals)
    timings["total"] = time.perf_counter() - started

    summary = report.summarize(results["eval"], tuned)
    if parallel.is_main():
        write_json_atomic(os.path.join(cfg.out, "summary.json"), summary)
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        machine = f"{int(os.environ.get('WORLD_SIZE', '1'))} x {device}"
        write_text_atomic(os.path.join(cfg.out, "report.md"), report.markdown(cfg, model, results, tuned, summary,
                                                                              timings, machine))
    _say()
    _say(report.format_report(results["eval"], tuned, summary, timings, "byte" if spec == "bytes" else "token"))
    _say(f"\nwritten: {cfg.out}/results.json, results.csv, summary.json, report.md, ppl_vs_length.png, "
         f"loss_by_position.png" + "".join(f"; {cfg.out}/{label}/" for label in results if label != "eval"))
    return summary
