"""What the commands share: source options, config from arguments, model building, run
folders, the one weights loader, and the process-wide session (logging, torchrun).

Importing this module imports no torch: the parsers use it for `--help`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import (
    CONFIG_NAME,
    TP_PLAN_FLAG,
    TrainConfig,
    load_config,
    merge,
    naming_the_file,
    read_plan_file,
    read_yaml,
)
from ..errors import LeantrainError, shorten
from ..recipes import RECIPES, get_recipe

log = logging.getLogger("leantrain")
NAME_MAX = 255  # bytes per file or folder name (ext4, xfs, btrfs, tmpfs)
PATH_MAX = 4096  # bytes in a whole path, its end included (Linux)

RAW = argparse.RawDescriptionHelpFormatter


def add_source_args(p: argparse.ArgumentParser) -> None:
    """What to train on: shared by every command that builds a model and data."""
    p.add_argument("--recipe", default="digits-cnn", choices=sorted(RECIPES),
                   help="named setup to start from (default: digits-cnn)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML config; keys as in `config.yaml` of a run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable, e.g. --set optim.lr=0.05")
    p.add_argument("--model", metavar="MOD:FN",
                   help="your model: a function returning an nn.Module, e.g. mypkg.nets:build")
    p.add_argument("--data", metavar="SOURCE",
                   help="digits | a .npz (x, y) | a .csv (label column) | an image folder "
                        "(class subfolders) | MOD:FN returning (train_dataset, val_dataset)")
    p.add_argument("--epochs", type=int, metavar="N", help="number of epochs")
    p.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_plan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", metavar="FILE",
                   help="a plan file written by `leantrain bench` (or a finder's --apply)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_source_args(p)
    add_plan_arg(p)
    p.add_argument("--target-acc", type=float, metavar="X",
                   help="stop as soon as validation accuracy reaches X (e.g. 0.97)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "fp8", "fp8-rowwise"],
                   help="mixed precision mode (default: auto = bf16 where native; fp8: GPUs of "
                        "compute capability >= 8.9)")
    p.add_argument("--compile", action="store_true",
                   help="always use torch.compile (default: measured, taken where it pays)")
    p.add_argument("--compile-mode", metavar="MODE",
                   choices=["default", "max-autotune", "max-autotune-no-cudagraphs",
                            "reduce-overhead"],
                   help="torch.compile's mode, implies --compile: max-autotune searches kernel "
                        "configurations; reduce-overhead replays CUDA graphs (CUDA only)")
    p.add_argument("--no-plan-cache", action="store_true",
                   help="measure the plan's auto choices again instead of reusing earlier "
                        "measurements of this model (plan.cache=false)")
    p.add_argument("--resume", metavar="DIR|auto",
                   help="continue the run in DIR from its last checkpoint (its own config); "
                        "auto (with --out DIR): continue DIR's run if it has a checkpoint, "
                        "else start it there (what a restarted job runs)")
    p.add_argument("--data-changed", action="store_true",
                   help="resume on data other than the run started with (its sizes or "
                        "samples differ; refused otherwise)")
    p.add_argument("--no-verify", action="store_true",
                   help="resume from a checkpoint whose SHA-256 is not recorded beside it "
                        "(checkpoint.pt.sha256 missing: a flipped bit would go unnoticed)")
    add_trust_flag(p)


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-run-code", action="store_true",
                   help="let a run folder's config.yaml name a model or data function to "
                        "import (off: pass the same --model/--data again to vouch for it)")


def refuse_folder_code(cfg: TrainConfig, folder: Path, args: argparse.Namespace,
                       flags: tuple[str, ...] = ("--model", "--data", TP_PLAN_FLAG)) -> None:
    """A run folder may come from anyone, and its config.yaml names what to import: a model
    or data function, a tensor-parallel plan. Like `trust_remote_code`, none is imported
    unless it is leantrain's own, the user names the same one again (`flags`: --model,
    --data, --set plan.parallel.tp_plan=...), or says --trust-run-code."""
    from ..data.sources import code_named_by

    if vars(args).get("trust_run_code"):
        return
    named = code_named_by(cfg.model, cfg.data.source, cfg.plan.parallel.tp_plan)
    for flag, spec in ((f, named[f]) for f in flags if f in named):
        if _named_again(args, flag) != spec:
            raise LeantrainError(
                f"{folder / CONFIG_NAME} names code to import ({_flag(flag, spec)}); "
                f"leantrain runs no code a run folder names: pass {_flag(flag, spec)} "
                "again if you trust it, or --trust-run-code")


def _named_again(args: argparse.Namespace, flag: str) -> str | None:
    """What the command line names for `flag` (--model, --data, or a --set key)."""
    if flag.startswith("--set "):
        key = flag.split(" ", 1)[1]
        values = [text.split("=", 1)[1].strip() for text in vars(args).get("overrides") or []
                  if text.split("=", 1)[0].strip() == key and "=" in text]
        return values[-1] if values else None
    return vars(args).get(flag.lstrip("-"))


def _flag(flag: str, spec: str) -> str:
    return f"{flag}={shorten(spec)}" if flag.startswith("--set ") else f"{flag} {shorten(spec)}"


def _shortcut_overrides(args: argparse.Namespace) -> dict:
    """The convenience flags, as config values (they win over --config and --set)."""
    values: dict = {}
    flag = vars(args).get
    pairs = [
        ("model", None, flag("model")), ("data", "source", flag("data")),
        ("train", "target_acc", flag("target_acc")), ("train", "epochs", flag("epochs")),
        ("plan", "device", flag("device")), ("plan", "precision", flag("precision")),
        ("plan", "compile", True if flag("compile") or flag("compile_mode") else None),
        ("plan", "compile_mode", flag("compile_mode")),
        ("plan", "cache", False if flag("no_plan_cache") else None),
    ]
    for section, key, value in pairs:
        if value is None:
            continue
        if key is None:
            values[section] = value
        else:
            values.setdefault(section, {})[key] = value
    return values


def _resumed_config(args: argparse.Namespace) -> TrainConfig:
    """The run's own config; only --epochs and --target-acc change, and --model/--data may
    only name again (vouch for) what the run already names."""
    from ..run.state import RESUMABLE_KEYS

    flag = vars(args).get
    changes = flag("overrides") or []
    fixed = [text.split("=", 1)[0].strip() for text in changes]
    fixed = [key for key in fixed if key not in RESUMABLE_KEYS | {"data.batch_size"}]
    given = [name for name, value in [
        ("--config", flag("config")), (f"--set {fixed[0] if fixed else ''}", fixed),
        ("--plan", flag("plan")),
        ("--out", flag("out")), ("--device", flag("device")), ("--precision", flag("precision")),
        ("--compile", flag("compile")), ("--compile-mode", flag("compile_mode")),
        ("--no-plan-cache", flag("no_plan_cache"))] if value]
    saved = load_config(Path(args.resume) / CONFIG_NAME) if not given else None
    if saved is not None:
        given = [name for name, value, before in [("--model", flag("model"), saved.model),
                                                  ("--data", flag("data"), saved.data.source)]
                 if value and value != before]
    if given:
        raise LeantrainError(f"--resume continues with the run's own config; drop "
                             f"{', '.join(given)} (only --epochs, --target-acc and --set of how "
                             "the run stops, logs, saves and loads batches may change on resume,"
                             " and data.batch_size where the global batch stays; --model and "
                             "--data may name the run's own again)")
    refuse_folder_code(saved, Path(args.resume), args)
    honoured = {"train": {k: v for k, v in (("epochs", flag("epochs")),
                                            ("target_acc", flag("target_acc"))) if v is not None}}
    return load_config(None, changes, merge(saved.to_dict(), honoured))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """recipe < --config < --plan < --set < shortcut flags; --resume: the run's own config."""
    if vars(args).get("resume"):
        return _resumed_config(args)
    recipe = get_recipe(args.recipe)
    in_file = read_yaml(args.config) if args.config else {}
    user = in_file
    if vars(args).get("plan"):
        user = merge(user, read_plan_file(args.plan))

    def load(settings: dict) -> TrainConfig:
        cfg = load_config(None, args.overrides, merge(merge({"recipe": recipe.name}, settings),
                                                      user))
        return load_config(None, (), merge(cfg.to_dict(), _shortcut_overrides(args)))

    with naming_the_file(args.config or "", in_file):
        cfg = load(recipe.config)
        if cfg.model is not None:  # the user's model: the recipe's tuned training is not theirs
            cfg = load(recipe.untuned())
    if args.config:
        _say_config_code(args, cfg)
    return cfg


def _say_config_code(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """A config file that names code is code: say which module and file it has imported."""
    from ..data.sources import code_named_by
    from ..imports import module_file

    named = code_named_by(cfg.model, cfg.data.source, cfg.plan.parallel.tp_plan)
    for option, spec in named.items():
        if _named_again(args, option) != spec:  # (named on the command line: the user's own choice)
            log.info("%s names code to import (%s %s): module %s, file %s", args.config,
                     option, shorten(spec), spec.partition(":")[0], module_file(spec))


def build_from(spec: str, what: str, seed: int):
    """Call the user's MOD:FN after seeding: every run and resume starts from the same weights."""
    import torch
    from torch import nn

    from ..imports import call_user

    torch.manual_seed(seed)
    model = call_user(spec, what)
    if not isinstance(model, nn.Module):
        raise LeantrainError(f"{what} {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def check_vocabulary(model, vocab_size: int, tokenizer: str | None) -> None:
    """A language model whose input embedding has fewer rows than the data has token ids
    fails at the first batch deep in an embedding lookup: say so before any work."""
    from torch import nn

    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else \
        next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and rows < vocab_size:
        source = f"the tokenizer {shorten(tokenizer, 80)}" if tokenizer else "the data"
        raise LeantrainError(f"the model's vocabulary ({rows:,} input embeddings) is smaller "
                             f"than {source}'s ({vocab_size:,} token ids); build it with a "
                             f"vocabulary of at least {vocab_size:,}")


def build_model(cfg: TrainConfig, bundle):
    """The user's model if named, the recipe's on the recipe's data, else a default for the data."""
    import torch

    from ..recipes.models import default_model

    if cfg.model:
        model = build_from(cfg.model, "--model", cfg.train.seed)
        if cfg.data.context is not None and bundle.num_classes is not None:
            check_vocabulary(model, bundle.num_classes, cfg.data.tokenizer)
        return model
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every run and resume
    recipe = get_recipe(cfg.recipe)
    text = cfg.data.context is not None
    if (recipe.text and text) or cfg.data.source == recipe.config.get("data", {}).get("source"):
        return recipe.build_model(bundle.num_classes, cfg)
    if text:
        raise LeantrainError("text data (data.context set) needs a language model: "
                             "--recipe text-gpt, or --model MOD:FN")
    if bundle.num_classes is None:
        raise LeantrainError("with --data MOD:FN, also pass --model MOD:FN (the number of "
                             "classes cannot be known from the datasets alone)")
    sample = bundle.train[0][0]
    log.info("no --model given: using a default model for samples of shape %s",
             tuple(sample.shape))
    return default_model(torch.as_tensor(sample), bundle.num_classes)


def load_inputs(args: argparse.Namespace, prefix: str):
    """(config, out folder, data, model builder) for the commands that build models per trial;
    the model is built once here, so a bad one fails before any trial."""
    from ..data import load_data

    cfg = config_from_args(args)
    out = default_out(args, prefix)  # a bad --out is refused before the data and model load
    claim_out(out, args.command)
    bundle = load_data(cfg.data)
    log.info("data: %s", bundle.description)
    build_model(cfg, bundle)
    return cfg, out, bundle, lambda: build_model(cfg, bundle)


def default_out(args: argparse.Namespace, prefix: str = "") -> Path:
    """--out, or a fresh timestamped folder under runs/; a file or a name the file system
    cannot hold is refused here, before any work."""
    if args.out:
        return check_out(Path(args.out))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / (f"{prefix}-{stamp}" if prefix else stamp)


def check_out(folder: Path) -> Path:
    """--out must be a folder (or not exist yet) whose every name fits the file system."""
    fits_file_system(folder, "--out")
    if folder.exists() and not folder.is_dir():
        raise LeantrainError(f"--out {shorten(folder)} is a file; give a folder")
    return folder


OWNER_NAME = ".leantrain-command"  # in an --out folder: the command that wrote it


def claim_out(folder: Path, command: str) -> None:
    """An --out that is new, empty, or written before by the same command (`mark_out`): a
    folder of anything else (a training run, another command's results, your own files) is
    refused before any work, so that nothing there is overwritten (`bench --out` once
    replaced a hand-written plan.yaml, and find-lr and doctor wrote into a run folder)."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    mark = folder / OWNER_NAME
    try:
        owner = mark.read_text(errors="replace").strip() if mark.is_file() else None
    except OSError:
        owner = None
    if owner != command:
        whose = f"`leantrain {shorten(owner, 40)}`'s results" if owner else \
            "files leantrain " + command + " did not write"
        raise LeantrainError(f"--out {shorten(folder)} holds {whose}; give a new or empty "
                             f"folder (or one an earlier `leantrain {command}` wrote)")


def mark_out(folder: Path, command: str) -> None:
    """Mark `folder` as `command`'s (after its results are written): the same command may
    write there again."""
    from ..checkpoint import atomic_write_text

    atomic_write_text(folder / OWNER_NAME, command + "\n")


def check_apply(path: str | None) -> Path | None:
    """An --apply target that can take a plan, checked before any work: a plan file to
    update (it must read as one), or a new file in an existing folder."""
    if path is None:
        return None
    target = Path(path)
    fits_file_system(target, "--apply")
    if target.is_dir():
        raise LeantrainError(f"--apply {shorten(target)} is a folder; give a plan file")
    if target.exists():
        read_plan_file(target)  # a file that is not a plan is one line, and stays as it is
    else:  # (a missing folder is made when the plan is written)
        above = next((p for p in target.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise LeantrainError(f"--apply {shorten(target)}: {shorten(above)} is a file, not "
                                 "a folder")
    return target


def fits_file_system(path: Path, flag: str) -> None:
    """Every name of `path` and the whole of it within the file system's limits, checked
    before anything touches it (exists() itself raises on a name or path too long)."""
    longest = max((len(part.encode()) for part in path.parts), default=0)
    if longest > NAME_MAX:
        raise LeantrainError(f"{flag} {shorten(path, 80)}: a name of {longest} bytes; the "
                             f"file system allows {NAME_MAX}")
    whole = len(os.path.abspath(path).encode())
    if whole >= PATH_MAX:
        raise LeantrainError(f"{flag} {shorten(path, 80)}: a path of {whole:,} bytes; the "
                             f"file system allows {PATH_MAX - 1:,}")


def require_empty(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise LeantrainError(f"{folder} is not empty; choose another --out")


def sample_inputs(bundle):
    """One validation sample's model inputs: a tensor, or for a dict sample the model's
    keyword inputs without its labels (what latency and multiply-adds are measured on)."""
    import torch

    from ..data.batching import first_sample
    from ..data.loaders import LABEL_KEYS

    sample = first_sample(bundle.val)
    if isinstance(sample, dict):
        return {k: torch.as_tensor(v) for k, v in sample.items() if k not in LABEL_KEYS}
    return torch.as_tensor(sample[0] if isinstance(sample, (tuple, list)) else sample)


def load_weights(model, checkpoint: str | Path, role: str = ""):
    """Trained weights into `model`: a model.pt state_dict, a run folder holding one, or a
    training checkpoint.pt (its "model" entry). Loaded weights-only; a mismatch is one line.

    `role` names the model in the message, e.g. "teacher".
    """
    from ..checkpoint import load_checkpoint
    from ..run.summary import MODEL_NAME

    path = Path(checkpoint)
    if path.is_dir():
        path = path / MODEL_NAME
    state = load_checkpoint(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).splitlines()[:3])[:400]
        who = f"{role} " if role else ""
        raise LeantrainError(f"{who}checkpoint {path} does not match the {who}model: "
                             f"{first}") from exc
    return model


@contextmanager
def session(debug: bool, own_process: bool = False, command: str = "") -> Iterator[object]:
    """The process around a command: logging (rank 0 reports progress), under torchrun a rank
    that dies with its launcher and leaves the process group when done, and, when the command
    is this process's own (`own_process`: started from the command line, one process),
    torch's threads fitted to the cores other processes leave free."""
    from ..distributed import DistContext, die_with_launcher, refuse_unlaunched_tasks, teardown
    from ..measure.load import fit_threads
    from ..quiet import IMPORT_NOISE

    dist = DistContext.from_env()
    if command != "launch":  # (the launcher itself runs outside torchrun, as one task)
        refuse_unlaunched_tasks(dict(os.environ))
    logging.basicConfig(level=logging.DEBUG if debug else
                        logging.INFO if dist.is_main else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in IMPORT_NOISE:  # third-party import chatter: not the user's business
        logging.getLogger(name).setLevel(logging.ERROR)
    held = None
    if dist.active:
        die_with_launcher()
    elif own_process and (fitted := fit_threads()):
        held = _SaidFirst(fitted)  # a refusal before any work stays one line
    succeeded = False
    try:
        yield dist
        succeeded = True
    finally:
        if held is not None:
            held.remove()
        teardown(dist, succeeded=succeeded)


class _SaidFirst(logging.Filter):
    """Holds a warning until the command first logs (its work has begun), then says it before
    that record: a command that refuses its input at once prints its one error line alone."""

    def __init__(self, line: str):
        super().__init__()
        self.line: str | None = line
        self.handlers = list(logging.getLogger().handlers)
        for handler in self.handlers:
            handler.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.line is not None:
            line, self.line = self.line, None
            log.warning(line)
        return True

    def remove(self) -> None:
        for handler in self.handlers:
            handler.removeFilter(self)
