"""The sub-commands: one module each, with `add_parser(subparsers)` and `run(args, dist)`.

A command module imports only argparse-level things at the top (the CLI builds every parser
for `--help`, which must not import torch); what it needs to run it imports inside `run`.
`common` holds what they share: source options, config from arguments, model building,
run folders and the one weights loader.
"""

# sub-command -> module under leantrain.commands; the parser lists them in this order
COMMANDS = {
    "train": "train", "distill": "distill", "bench": "bench", "find-batch-size": "finders",
    "find-lr": "finders", "doctor": "doctor", "launch": "launch", "compress": "compress",
    "generate": "generate", "tune": "tune", "export": "export",
}
