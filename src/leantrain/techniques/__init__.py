"""Runtime techniques: one module each, with NAME, LOSSLESS, supported(...) and apply functions.

The registry below is what `plan` resolves and what a benchmark iterates: adding a technique
is adding a module and one line here.
"""

from . import (
    accumulation,
    backend_flags,
    checkpointing,
    clipping,
    compile,
    init,
    loader,
    memory_format,
    optimizer,
    precision,
    schedules,
)

REGISTRY = {
    module.NAME: module
    for module in (
        loader, precision, memory_format, compile, backend_flags, optimizer, accumulation,
        clipping, init, schedules, checkpointing,
    )
}

__all__ = ["REGISTRY"]
