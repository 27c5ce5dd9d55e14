"""The controller: the one driver-side loop that every trainer runs through.

Modelled on Ray Train v2's controller: it alone acquires, watches and releases
the worker group, it steps through explicit states, and a small failure policy
(Ray Train's ``FailureConfig``, torchrun's ``--max-restarts``) turns an error into
a decision::

    SCHEDULING --> RUNNING --> FINISHED
        ^             |
        |             | a worker lost (killed, out of memory, its node gone)
        +-- RESTARTING   and failures left: every worker starts again from the
                      |  latest checkpoint, or from the start when there is none
                      v
                   ERRORED   an exception raised by user or framework code (never
                             retried), or no failures left

A trainer keeps only what is its own (:class:`Trainer`): how an attempt sets the
group up (a collective, a master port), what each worker runs, what its progress
events mean (metrics, checkpoints), where the next attempt starts, and what the
finished run leaves (a model brought back from rank 0).
"""

from __future__ import annotations

import enum
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from neve._internal.context import WorkerContext
from neve._internal.runtime import group
from neve._internal.runtime.placement import Layout
from neve.exceptions import ClusterError, WorkerError, WorkerLostError

logger = logging.getLogger(__name__)

#: attempts whose set-up failed in a way a new attempt avoids (a port taken between
#: being picked and being bound), on top of max_failures
SETUP_RETRIES = 2


class State(enum.Enum):
    SCHEDULING = "scheduling"
    RUNNING = "running"
    RESTARTING = "restarting"
    FINISHED = "finished"
    ERRORED = "errored"


@dataclass
class Attempt:
    """What one attempt runs: a function and a context per worker, and its teardown."""

    entry: Callable[[WorkerContext], Any]
    contexts: Sequence[WorkerContext]
    teardown: Callable[[], None] = field(default=lambda: None)


class Trainer(ABC):
    """The framework-specific part of a run (GBDT's runner, PyTorch's distributor)."""

    name: str
    layout: Layout

    @abstractmethod
    def setup(self, workers: group.WorkerGroup, attempt: int) -> Attempt:
        """Prepare an attempt on a fresh or warm group (collective, ports, contexts)."""

    @abstractmethod
    def on_events(self, workers: group.WorkerGroup, events: list[Any]) -> None:
        """Progress rank 0 reported (metrics, checkpoints), while the attempt runs."""

    @abstractmethod
    def restart(self, error: WorkerError) -> str:
        """Prepare the next attempt after a lost worker; say where it starts."""

    def finish(self, workers: group.WorkerGroup, results: list[Any]) -> Any:
        """What the run leaves, made while the group is still held (the default:
        every rank's result)."""
        return results

    def setup_retryable(self, error: WorkerError) -> bool:
        """Whether a failed attempt is worth a new one outside the failure budget."""
        return False


class FailurePolicy:
    """A lost worker is retried up to ``max_failures`` times; an exception raised by
    user or framework code never is. It keeps what happened, for the final error."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures = 0
        self.history: list[str] = []

    def should_retry(self, error: WorkerError) -> bool:
        return isinstance(error, WorkerLostError) and self.failures < self.max_failures

    def record(self, error: WorkerError, resumed: str) -> None:
        self.failures += 1
        self.history.append(f"{first_line(error)} -> restarted every worker {resumed}")

    def summary(self) -> str:
        if not self.history:
            return ""
        lines = [f"  {i}. {entry}" for i, entry in enumerate(self.history, 1)]
        return (f"Earlier failures of this run ({self.failures} of "
                f"max_failures={self.max_failures}):\n" + "\n".join(lines))

    def final(self, error: WorkerError) -> WorkerError:
        """The error that ends the run, with what was tried."""
        if not isinstance(error, WorkerLostError):
            return error  # the user's or the framework's own exception: as it was
        if self.max_failures == 0:
            tried = ("No restart was tried: max_failures=0 (set max_failures=N to restart "
                     "every worker after a lost one, up to N times).")
        else:
            tried = (f"Every restart was used (max_failures={self.max_failures}).\n"
                     + self.summary())
        return WorkerLostError(f"{error}\n\n{tried}", rank=error.rank)


def first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def run(trainer: Trainer, *, max_failures: int) -> Any:
    """Run ``trainer`` to the end through every attempt it needs; what it leaves."""
    policy = FailurePolicy(max_failures)
    attempt = setup_retries = 0
    while True:
        state = State.SCHEDULING
        logger.debug("%s: %s (attempt %d)", trainer.name, state.value, attempt)
        try:
            workers = group.acquire(trainer.layout)
        except ClusterError as exc:
            if policy.history:  # e.g. a node left and the layout no longer fits
                raise type(exc)(f"{exc}\n\n{policy.summary()}") from exc
            raise
        try:
            plan = trainer.setup(workers, attempt)
        except BaseException:  # a group that never ran must not keep its CPUs
            workers.shutdown()
            raise
        state = State.RUNNING
        try:
            results = workers.run(plan.entry, plan.contexts,
                                  on_events=functools.partial(trainer.on_events, workers))
        except WorkerError as exc:  # the group is shut down already
            if trainer.setup_retryable(exc) and setup_retries < SETUP_RETRIES:
                setup_retries += 1
                logger.warning("%s: %s; retrying", trainer.name, first_line(exc))
                continue
            if not policy.should_retry(exc):
                state = State.ERRORED
                raise policy.final(exc) from exc.__cause__
            state = State.RESTARTING
            resumed = trainer.restart(exc)
            policy.record(exc, resumed)
            logger.warning("%s: %s; restarting every worker %s (failure %d of "
                           "max_failures=%d)", trainer.name, first_line(exc), resumed,
                           policy.failures, max_failures)
            attempt += 1
            continue
        finally:
            plan.teardown()
        try:
            outcome = trainer.finish(workers, results)
        except BaseException:
            workers.shutdown()
            raise
        group.release(workers)
        state = State.FINISHED
        logger.debug("%s: %s after %d attempt(s)", trainer.name, state.value, attempt + 1)
        return outcome
