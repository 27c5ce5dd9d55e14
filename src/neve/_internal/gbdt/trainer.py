"""A GBDT fit as the controller runs it: attempts, progress, checkpoints, restarts.

Rank 0 sends each round's metrics to the driver, and a checkpoint (the model so
far) every ``checkpoint_every`` rounds. The driver keeps the history and the
latest checkpoint; with a checkpoint stage it also commits each checkpoint there
(``<stage>/checkpoints/<request_id>/``), so a fit whose driver died resumes from
it (``fit(..., resume_from=...)``). After a lost worker every worker starts again
from the latest checkpoint (xgboost's ``xgb_model``, LightGBM's ``init_model``),
or from the start when there is none; with ``hist`` and the same data the result
equals an uninterrupted fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from neve._internal.context import WorkerContext
from neve._internal.progress import Progress
from neve._internal.runtime import controller, cpus, group
from neve._internal.runtime.placement import Layout
from neve._internal.stages import Checkpoint, CheckpointStore, MemoryFiles
from neve.exceptions import WorkerError

if TYPE_CHECKING:
    from neve._internal.gbdt.runner import Backend, TrainResult, TrainTask

logger = logging.getLogger(__name__)


@dataclass
class History:
    """What the driver keeps of a fit in flight: metrics of every round so far, and
    the latest checkpoint."""

    checkpoint: Any = None  # the model after ``rounds_done`` rounds (bytes or str)
    rounds_done: int = 0
    rounds: list[dict[str, dict[str, float]]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)

    def record(self, event: dict[str, Any]) -> bool:
        """Take one event from rank 0; whether it carried a checkpoint."""
        self.last = event
        del self.rounds[event["iteration"]:]
        self.rounds.append(event.get("metrics") or {})
        if "checkpoint" not in event:
            return False
        self.checkpoint = event["checkpoint"]
        self.rounds_done = event["iteration"] + 1
        return True

    def rewind(self) -> None:
        """Forget the rounds after the latest checkpoint (they will be trained again)."""
        del self.rounds[self.rounds_done:]

    def merged(self, tail: dict[str, dict[str, list[float]]],
               offset: int) -> dict[str, dict[str, list[float]]]:
        """The rounds before ``offset`` (from events) followed by the last attempt's."""
        if offset == 0:
            return tail
        out: dict[str, dict[str, list[float]]] = {}
        for metrics in self.rounds[:offset]:
            for data, values in metrics.items():
                for name, value in values.items():
                    out.setdefault(data, {}).setdefault(name, []).append(value)
        for data, log in tail.items():
            for name, series in log.items():
                out.setdefault(data, {}).setdefault(name, []).extend(series)
        return out

    # -- durable form -----------------------------------------------------------------

    def files(self) -> MemoryFiles:
        model = self.checkpoint
        return MemoryFiles({"model": model.encode() if isinstance(model, str) else bytes(model)})

    def state(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done, "rounds": self.rounds[:self.rounds_done],
                "model_is_text": isinstance(self.checkpoint, str)}

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> History:
        state = checkpoint.state
        model: Any = checkpoint.files.read("model")
        if state.get("model_is_text"):
            model = model.decode()
        rounds = [dict(r) for r in state.get("rounds", [])]
        return cls(model, int(state["rounds_done"]), rounds)


class GBDTTrainer(controller.Trainer):
    """One distributed GBDT fit, for the controller."""

    def __init__(self, backend: Backend, task: TrainTask, layout: Layout, progress: Progress,
                 history: History, store: CheckpointStore | None) -> None:
        self.backend = backend
        self.name = backend.name
        self.layout = layout
        self.progress = progress
        self.history = history
        self.store = store
        self.total_rounds = task.round_offset + task.num_boost_round
        self.first = task  # where a restart without any checkpoint starts again
        self.task = task

    def setup(self, workers: group.WorkerGroup, attempt: int) -> controller.Attempt:
        collective, close = self.backend.start_collective(workers)
        task = replace(self.task, collective=collective)
        contexts = [
            WorkerContext(rank=w.rank, world_size=workers.num_workers, local_rank=w.local_rank,
                          local_world_size=w.local_world_size, node_rank=w.node_rank)
            for w in workers.workers
        ]
        return controller.Attempt(_Entry(self.backend, task), contexts, close)

    def on_events(self, workers: group.WorkerGroup, events: list[Any]) -> None:
        for event in events:
            if self.history.record(event) and self.store is not None:
                self.store.save(self.history.rounds_done, self.history.files(),
                                self.history.state())
            self.progress.step(event["iteration"], event.get("metrics"))

    def restart(self, error: WorkerError) -> str:
        if self.history.rounds_done <= self.first.round_offset:  # no checkpoint of its own yet
            self.task = self.first
            self.history.rewind()
            start = self.first.round_offset
            return f"from round {start}, where this fit resumed" if start else "from the start"
        done = self.history.rounds_done
        self.task = replace(self.task, init_model=self.history.checkpoint,
                            num_boost_round=self.total_rounds - done, round_offset=done)
        self.history.rewind()
        return f"from the checkpoint at round {done}"

    def setup_retryable(self, error: WorkerError) -> bool:
        return self.backend.retryable(error)

    def finish(self, workers: group.WorkerGroup, results: list[Any]) -> TrainResult:
        from neve._internal.gbdt.runner import TrainResult

        result = results[0]
        if not isinstance(result, TrainResult):
            raise WorkerError("rank 0 returned no model", rank=0)
        result.evals_result = self.history.merged(result.evals_result, self.task.round_offset)
        return result


class _Entry:
    """What each worker runs (picklable: the backend and the frozen task)."""

    def __init__(self, backend: Backend, task: TrainTask) -> None:
        self.backend = backend
        self.task = task

    def __call__(self, ctx: WorkerContext) -> Any:
        with cpus.pinned(self.task.pin_cpus, ctx.local_world_size):
            return self.backend.train(self.task, ctx)
