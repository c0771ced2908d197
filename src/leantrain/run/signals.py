"""SIGTERM and SIGINT during training: finish the step, write a checkpoint, exit naming it.

SIGTERM is what a cluster scheduler or a spot instance sends before it stops a job; Ctrl-C
sends SIGINT. Either is noted by a handler and acted on at the next optimizer step (all
ranks at the same step, see `Trainer`), so the checkpoint is a whole step's state and the
resumed run continues bit for bit. A second signal stops at once, as Python's default would.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import torch

from .. import distributed
from ..distributed import DistContext
from ..errors import LeantrainError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(LeantrainError):
    """The run stopped on a signal after writing a checkpoint; exit 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Installs the handlers for its `with` block (main thread only: elsewhere Python cannot)."""

    def __init__(self, when: str = "after this step, writing a checkpoint") -> None:
        self.signum: int | None = None
        self.when = when  # what the first signal does, in the warning it logs
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second signal: no more waiting
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping %s (send it again to stop at once)",
                    signal.Signals(signum).name, self.when)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            # a signal the process was told to ignore (SIGINT in a background job, nohup)
            # stays ignored
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS
                              if signal.getsignal(sig) is not signal.SIG_IGN}
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def agreed(self, step: int, dist: DistContext, log_every: int,
               device: torch.device) -> bool:
        """A signal was received here (or, under launch, on any rank: the ranks agree at log
        steps, so that all of them checkpoint the same step and none waits on another)."""
        if not dist.active:
            return self.requested
        if step % log_every:
            return False
        flag = torch.tensor([float(self.requested)], device=device)
        return bool(distributed.all_reduce_sum([flag], dist, everywhere=True)[0].item())

    def stop(self, step: int, resume_command: str | None,
             save_checkpoint: Callable[[], None]) -> None:
        """Write the checkpoint (with a run folder, whose `resume_command` continues it) and
        raise `Stopped` naming what next."""
        name = signal.Signals(self.signum or signal.SIGTERM)
        if resume_command is None:
            raise Stopped(f"stopped by {name.name} at step {step} (no run folder: nothing "
                          "saved)", name.value)
        save_checkpoint()
        raise Stopped(f"stopped by {name.name} at step {step}; checkpoint written; continue "
                      f"with: {resume_command}", name.value)
