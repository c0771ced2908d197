"""Third-party chatter kept off the user's terminal: what libraries print about their own
build when they are imported is not about the user's run."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# loggers whose lines at import are about their own build, not the user's run (torchao's
# missing CUDA kernels on a CPU machine, torch's notice about torchao's enums)
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Third-party import-time warnings and log lines kept off the user's terminal (errors
    still pass): loading a checkpoint printed four lines of torchao's own."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
