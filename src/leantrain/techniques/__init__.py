"""Runtime techniques: one module each (see `base` for the contract the plan relies on).

`REGISTRY` is what `run.plan` decides (the modules with a `decide`) and what the bench
iterates (every module's VARIANTS, or its BENCH_NOTE saying why it is not a speed-up to rank):
adding a technique is adding a module and one line here. The order is the summary's order.
"""

from . import (
    accumulation,
    checkpointing,
    clipping,
    compile,
    compile_mode,
    cudnn_benchmark,
    fused_cross_entropy,
    init,
    loader,
    memory_format,
    optimizer,
    optimizer_offload,
    optimizer_states,
    precision,
    schedules,
    tf32,
)

REGISTRY = {
    module.NAME: module
    for module in (
        loader, precision, memory_format, compile, compile_mode, cudnn_benchmark, tf32, optimizer,
        optimizer_states, optimizer_offload, accumulation, clipping, init, schedules, checkpointing,
        fused_cross_entropy,
    )
}
# the techniques the plan decides, in order; the name is the key under `plan.`
PLANNED = tuple(module for module in REGISTRY.values() if hasattr(module, "decide"))

__all__ = ["PLANNED", "REGISTRY"]
