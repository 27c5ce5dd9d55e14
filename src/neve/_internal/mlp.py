"""The small built-in MLP of ``neve train`` and ``neve demo``, and how it trains and predicts.

``train_func`` runs in every worker of a :class:`~neve.pytorch.PyTorchDistributor`
run, reading its shard with ``get_shard().to_torch_dataset()``; everything it
needs comes through ``hyper_params`` (plain values) and ``dataset_map``
(``"train"``, optionally ``"eval"``). Features are standardised inside the
model, with means and deviations all-reduced over every worker's shard before
the first step, so the saved ``model.pt`` is self-contained: ``model.json``
next to it names the input columns, and :func:`load` rebuilds the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

OBJECTIVES = ("regression", "binary")
MODEL_FILE = "model.pt"
META_FILE = "model.json"
#: rank 0 reports a running loss this often (steps), which drives the driver's bar
REPORT_EVERY_STEPS = 25


def roc_auc(label: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve from rank statistics (ties get their average rank)."""
    label = np.asarray(label).astype(bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    positives = int(label.sum())
    negatives = label.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each value
    rank_sum = float(average_rank[inverse][label].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def log_loss(label: np.ndarray, probability: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probability, dtype=np.float64).ravel(), 1e-15, 1 - 1e-15)
    y = np.asarray(label, dtype=np.float64).ravel()
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def build(num_inputs: int, hidden: Sequence[int]) -> Any:
    """The model: standardise (buffers ``mean``/``scale``), then Linear+ReLU layers, one output."""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(num_inputs))
            self.register_buffer("scale", torch.ones(num_inputs))
            layers: list[nn.Module] = []
            width = num_inputs
            for size in hidden:
                layers += [nn.Linear(width, size), nn.ReLU()]
                width = size
            layers.append(nn.Linear(width, 1))
            self.net = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean, scale = self.get_buffer("mean"), self.get_buffer("scale")
            z = torch.nan_to_num((x - mean) / scale, nan=0.0)  # missing -> the mean
            return self.net(z).squeeze(-1)

    return MLP()


def _features(batch: Mapping[str, Any], inputs: Sequence[str]) -> Any:
    import torch

    return torch.stack([torch.as_tensor(batch[c]).float() for c in inputs], dim=1)


def _column_stats(connector: Any, inputs: Sequence[str]) -> np.ndarray:
    """``[count, sum, sum of squares]`` per column over non-missing values (float64)."""
    from neve._internal.gbdt.features import FeatureSpec, feature_matrix

    spec = FeatureSpec(tuple(inputs), inputs[0])
    stats = np.zeros((3, len(inputs)), dtype=np.float64)
    for batch in connector.iter_batches(262_144, columns=list(inputs)):
        x = feature_matrix(batch, spec).astype(np.float64)
        present = ~np.isnan(x)
        x = np.where(present, x, 0.0)
        stats[0] += present.sum(axis=0)
        stats[1] += x.sum(axis=0)
        stats[2] += (x * x).sum(axis=0)
    return stats


def train_func() -> None:
    """One worker's part: standardise, train with DDP over its shard, evaluate, save (rank 0)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from neve.pytorch import get_context

    ctx = get_context()
    hp = ctx.get_hyper_params()
    inputs: list[str] = list(hp["inputs"])
    label: str = hp["label"]
    binary = hp["objective"] == "binary"
    torch.manual_seed(int(hp.get("seed", 0)))
    datasets = ctx.get_dataset_map()
    shard = datasets["train"].get_shard()
    dist.init_process_group(backend=ctx.get_default_backend())  # neve's: already set up

    stats = torch.from_numpy(_column_stats(shard, inputs))
    dist.all_reduce(stats)
    count = stats[0].clamp(min=1)
    mean = stats[1] / count
    std = (stats[2] / count - mean * mean).clamp(min=0).sqrt()
    model = build(len(inputs), hp["hidden"])
    model.mean.copy_(mean.float())
    model.scale.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)).float())
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=float(hp["lr"]))
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.MSELoss()
    reporter = ctx.get_metrics_reporter()
    # Equal shards and exact batches: every rank takes the same number of steps.
    data = shard.to_torch_dataset(batch_size=int(hp["batch_size"]), shuffle=True,
                                  drop_last_batch=False, columns=[*inputs, label],
                                  seed=int(hp.get("seed", 0)))
    for epoch in range(1, int(hp["epochs"]) + 1):
        ddp.train()
        total = torch.zeros(2, dtype=torch.float64)
        for step, batch in enumerate(data, start=1):
            x = _features(batch, inputs)
            y = torch.as_tensor(batch[label]).float()
            loss = loss_fn(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64)
            if step % REPORT_EVERY_STEPS == 0:
                reporter.log_metrics({"epoch": epoch, "loss": round(float(total[0] / total[1]), 5)})
        dist.all_reduce(total)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": float(total[0] / total[1])}
        if "eval" in datasets:
            metrics.update(_evaluate(model, datasets["eval"], inputs, label, binary))
        reporter.log_metrics(metrics)

    if ctx.get_rank() == 0:
        model_dir = ctx.get_model_dir()
        torch.save(model.state_dict(), os.path.join(model_dir, MODEL_FILE))
        meta = {"model": "neve MLP", "inputs": inputs, "label": label,
                "objective": hp["objective"], "hidden": list(hp["hidden"])}
        with open(os.path.join(model_dir, META_FILE), "w") as handle:
            json.dump(meta, handle, indent=2)


def _evaluate(model: Any, connector: Any, inputs: Sequence[str], label: str,
              binary: bool) -> dict[str, float]:
    """Loss (and AUC when binary) over the eval set: each rank scores its shard."""
    import torch
    import torch.distributed as dist

    model.eval()
    part = connector.get_shard() if hasattr(connector, "get_shard") else connector
    scores, labels = predict(model, part, inputs, label=label)
    if binary:
        p = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
        p = np.clip(p, 1e-15, 1 - 1e-15)
        losses = -(labels * np.log(p) + (1 - labels) * np.log1p(-p))
    else:
        losses = (scores.astype(np.float64) - labels) ** 2
    total = torch.tensor([losses.sum(), len(losses)], dtype=torch.float64)
    dist.all_reduce(total)
    out = {"eval_loss": float(total[0] / max(float(total[1]), 1.0))}
    if binary:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (scores, labels))
        out["eval_auc"] = roc_auc(np.concatenate([g[1] for g in gathered]),
                                  np.concatenate([g[0] for g in gathered]))
    model.train()
    return out


def predict(model: Any, connector: Any, inputs: Sequence[str], *,
            label: str | None = None, batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs (logits when binary) for every row, and the labels when ``label`` is named."""
    import torch

    from neve._internal.gbdt.features import FeatureSpec, feature_matrix

    spec = FeatureSpec(tuple(inputs), label or inputs[0])
    columns = [*inputs, label] if label else list(inputs)
    outputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with torch.no_grad():
        for batch in connector.iter_batches(batch_rows, columns=columns):
            x = torch.from_numpy(feature_matrix(batch, spec))
            outputs.append(model(x).numpy())
            if label:
                labels.append(batch.column(label).to_numpy(zero_copy_only=False).astype(np.float64))
    score = np.concatenate(outputs) if outputs else np.empty(0, dtype=np.float32)
    truth = np.concatenate(labels) if labels else np.empty(0, dtype=np.float64)
    return score, truth


def load(model_dir: str) -> tuple[Any, dict[str, Any]]:
    """The model a run published (eval mode) and its ``model.json``."""
    import torch

    with open(os.path.join(model_dir, META_FILE)) as handle:
        meta = json.load(handle)
    model = build(len(meta["inputs"]), meta["hidden"])
    model.load_state_dict(torch.load(os.path.join(model_dir, MODEL_FILE), weights_only=True))
    model.eval()
    return model, meta


def probability(logits: np.ndarray) -> np.ndarray:
    """The sigmoid of logits, without overflow warnings."""
    z = np.asarray(logits, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))),
                    np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def check_hidden(value: Any) -> list[int] | None:
    """``hidden`` as a list of layer widths, or ``None`` if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (isinstance(value, list) and value
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        return list(value)
    return None


__all__ = ["build", "check_hidden", "load", "log_loss", "predict", "probability", "roc_auc",
           "train_func"]
