"""`leantrain generate`: sample text from a trained byte-level language model (text-gpt)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import CONFIG_NAME, load_config
from ..errors import LeantrainError, shorten
from ..recipes import get_recipe
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="sample text from a trained byte-level language model (text-gpt)",
        description="Load a text run's model and continue the prompt byte by byte.",
        epilog="example:\n  leantrain train --recipe text-gpt --out runs/gpt\n"
               "  leantrain generate --checkpoint runs/gpt --prompt 'def main('",
        formatter_class=common.RAW)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the run folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokens", type=int, default=200, metavar="N", help="bytes to add")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, metavar="K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", metavar="MOD:FN",
                   help="the model function the run's config.yaml names, given again to vouch "
                        "for it (a folder's config alone never makes leantrain import code)")
    common.add_trust_flag(p)


def run(args: argparse.Namespace, dist) -> int:
    import torch

    from ..data.text import VOCAB
    from ..recipes.gpt import generate
    from ..run.summary import MODEL_NAME

    folder = Path(args.checkpoint)
    for name in (CONFIG_NAME, MODEL_NAME):
        if not (folder / name).is_file():
            raise LeantrainError(f"--checkpoint {folder}: no {name} there (pass a run folder of "
                                 "`leantrain train`)")
    if args.tokens < 1 or args.top_k < 1:
        raise LeantrainError("--tokens and --top-k must be >= 1")
    if not args.prompt:
        raise LeantrainError("--prompt is empty: give the text to continue")
    if not 0 <= args.seed < 2**63:
        raise LeantrainError(f"--seed must be in 0..2**63-1, got {shorten(args.seed, 40)}")
    if not 0 <= args.temperature < float("inf"):
        raise LeantrainError(f"--temperature must be >= 0 (0: greedy) and finite, got "
                             f"{args.temperature}")
    cfg = load_config(folder / CONFIG_NAME)
    common.refuse_folder_code(cfg, folder, args, flags=("--model",))
    if cfg.data.context is None:
        raise LeantrainError(f"{folder} is not a text run (data.context is not set): generate "
                             "needs a byte-level language model, e.g. --recipe text-gpt")
    model = common.build_from(cfg.model, "--model", cfg.train.seed) if cfg.model \
        else get_recipe(cfg.recipe).build_model(VOCAB, cfg)
    common.load_weights(model, folder / MODEL_NAME)
    # the prompt's own bytes, as the command line gave them (not UTF-8 ones too: the model
    # reads bytes)
    prompt = torch.tensor(list(args.prompt.encode("utf-8", "surrogateescape")),
                          dtype=torch.long)
    out = generate(model, prompt, args.tokens, cfg.data.context, args.temperature, args.top_k,
                   torch.Generator().manual_seed(args.seed))
    print(bytes(out.tolist()).decode("utf-8", errors="replace"))
    return 0
