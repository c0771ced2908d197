"""The bench layer: timed trials of plans through the trainer's real step, the search that ranks
them, and the batch-size and learning-rate finders. It sits above the trainer (it drives
`Trainer.steps`) and below the CLI."""

from .batch_size import BatchSizeResult, find_batch_size
from .lr_finder import LRFinderResult, find_lr
from .search import BenchResult, run_bench

__all__ = ["BatchSizeResult", "BenchResult", "LRFinderResult", "find_batch_size", "find_lr",
           "run_bench"]
