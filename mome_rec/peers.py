"""Peer models from torch-rechub, trained on mome_rec's split and arrays for the comparison table.

torch-rechub 0.9.0 (the optional ``bench`` extra: ``pip install -e ".[bench]"``)
provides SharedBottom, MMOE, PLE and AITM. Each is built at the dimensions of
the config (``model.embedding_dim``, ``model.hidden_dims`` as bottom or
expert MLP, ``model.tower_dims``, ``model.num_experts``, the CGC/PLE split of
:func:`~mome_rec.modules.ple.split_experts`, ``model.dropout``) and fed from
the same :class:`~mome_rec.data.preprocess.Preprocessor` and
:class:`~mome_rec.data.batches.BatchStream` as mome_rec's trainer: one
``SparseFeature`` per sparse column with the column's table size, and one
``DenseFeature`` per standardised dense column, passed as a dict of tensors.

Training follows the trainer where the libraries allow. Adam with
``train.lr`` updates every parameter, the embedding tables included, because
torch-rechub keeps them in plain ``nn.Embedding``. Batches, epochs and the
loss (the mean of the per-task binary cross-entropies) are the trainer's, and
the epoch with the best validation average AUC is kept and tested.
"""

import copy
import dataclasses
import importlib.metadata
import logging
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mome_rec.config import Config
from mome_rec.data.batches import BatchStream
from mome_rec.data.preprocess import Arrays, Preprocessor
from mome_rec.data.sources import resolve_splits
from mome_rec.metrics import average_auc, task_metrics
from mome_rec.modules.ple import split_experts
from mome_rec.sizes import BYTES_PER_MB, module_fp32_bytes

logger = logging.getLogger(__name__)

RECHUB_PACKAGE = "torch-rechub"
RECHUB_VERSION = "0.9.0"
"""The torch-rechub version the peer block was written against (the ``bench`` extra pins it)."""

PEER_MODELS: Dict[str, str] = {
    "shared_bottom": "SharedBottom",
    "mmoe": "MMOE",
    "ple": "PLE",
    "aitm": "AITM",
}
"""mome_rec over-arch name -> the torch-rechub class at the same position in the table."""

# Probabilities are clipped before the log, as in mome_rec.metrics.
_EPS = 1e-7


def rechub_version() -> Optional[str]:
    """Return the installed torch-rechub version, or None when it is not installed."""
    try:
        return importlib.metadata.version(RECHUB_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass
class PeerData:
    """The split of one config, read through mome_rec's preprocessing.

    Attributes:
        preprocessor: fitted on the training rows, as by the trainer.
        tasks: label columns in order.
        train, validation, test: streams of one process (rank 0 of 1).
    """

    preprocessor: Preprocessor
    tasks: List[str]
    train: BatchStream
    validation: BatchStream
    test: BatchStream


def load_peer_data(config: Config) -> PeerData:
    """Resolve the splits of ``config.data`` and fit the preprocessor, as the trainer does."""
    data, train = config.data, config.train
    splits = resolve_splits(data)
    preprocessor = Preprocessor.fit(splits.train, splits.schema, holdout=splits.holdout, read_rows=data.read_batch_rows)
    common = dict(read_rows=data.read_batch_rows)
    train_stream = BatchStream(
        splits.train, preprocessor, train.batch_size, split="train", shuffle=True, seed=train.seed,
        holdout=splits.holdout, shuffle_buffer_rows=data.shuffle_buffer_rows, **common,
    )
    if splits.validation:
        validation = BatchStream(splits.validation, preprocessor, train.eval_batch_size, split="eval", **common)
    else:
        validation = BatchStream(splits.train, preprocessor, train.eval_batch_size, split="eval", holdout=splits.holdout, **common)
    test = BatchStream(splits.test, preprocessor, train.eval_batch_size, split="eval", **common)
    return PeerData(preprocessor, list(splits.schema.labels), train_stream, validation, test)


def feature_dict(arrays: Arrays, preprocessor: Preprocessor, device: torch.device) -> Dict[str, torch.Tensor]:
    """Return torch-rechub's input: sparse column -> ``B`` int64 ids, dense column -> ``B`` float32 values."""
    schema = preprocessor.schema
    features = {
        column: torch.from_numpy(np.ascontiguousarray(arrays.sparse[:, index])).to(device)
        for index, column in enumerate(schema.sparse)
    }
    for index, column in enumerate(schema.dense):
        features[column] = torch.from_numpy(np.ascontiguousarray(arrays.dense[:, index], dtype=np.float32)).to(device)
    return features


def build_peer(name: str, config: Config, preprocessor: Preprocessor, num_tasks: int) -> nn.Module:
    """Build the torch-rechub model standing for mome_rec's over-arch ``name`` (a key of :data:`PEER_MODELS`).

    Raises ModuleNotFoundError when torch-rechub is not installed.
    """
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import AITM, MMOE, PLE, SharedBottom

    model_cfg = config.model
    features = [
        SparseFeature(column, vocab_size=size, embed_dim=model_cfg.embedding_dim)
        for column, size in preprocessor.table_sizes().items()
    ]
    features += [DenseFeature(column) for column in preprocessor.schema.dense]
    mlp = {"dims": list(model_cfg.hidden_dims), "dropout": model_cfg.dropout}
    towers = [{"dims": list(model_cfg.tower_dims), "dropout": model_cfg.dropout} for _ in range(num_tasks)]
    task_types = ["classification"] * num_tasks

    if name == "shared_bottom":
        return SharedBottom(features, task_types, bottom_params=mlp, tower_params_list=towers)
    if name == "mmoe":
        return MMOE(features, task_types, n_expert=model_cfg.num_experts, expert_params=mlp, tower_params_list=towers)
    if name == "ple":
        shared, per_task = split_experts(model_cfg, num_tasks)
        return PLE(
            features, task_types, n_level=2, n_expert_specific=per_task, n_expert_shared=shared,
            expert_params=mlp, tower_params_list=towers,
        )
    if name == "aitm":
        return AITM(features, num_tasks, bottom_params=mlp, tower_params_list=towers)
    raise ValueError(f"no torch-rechub peer for {name!r} (known: {', '.join(PEER_MODELS)})")


def network_bytes(model: nn.Module) -> int:
    """Return the fp32 bytes of a torch-rechub model without its embedding tables."""
    return module_fp32_bytes(model) - module_fp32_bytes(model.embedding)


def predict(model: nn.Module, stream: BatchStream, preprocessor: Preprocessor, device: torch.device):
    """Return the probabilities and labels (``N x T``) of a whole split."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for arrays in stream.iter_arrays():
            scores.append(model(feature_dict(arrays, preprocessor, device)).float().cpu().numpy())
            labels.append(arrays.labels)
    model.train(was_training)
    return np.concatenate(scores), np.concatenate(labels)


def train_peer(name: str, config: Config, data: PeerData, device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    """Train the torch-rechub peer of ``name`` with ``config.train`` and return metrics shaped like the trainer's.

    The returned dict has ``test`` and ``validation`` (per task ``auc`` and
    ``logloss``), ``best_validation_average_auc``, ``size_mb`` (``deployable``
    and ``dense_fp32``: the network without embedding tables in fp32;
    ``embeddings``), ``history`` (per epoch ``epoch``, ``phase``, ``train_loss``,
    ``l0``, ``validation``, ``sparsity``, ``seconds``) and ``wall_seconds``.
    """
    started = time.time()
    train = config.train
    torch.manual_seed(train.seed)
    model = build_peer(name, config, data.preprocessor, len(data.tasks)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    steps = len(data.train)
    if train.max_steps_per_epoch is not None:
        steps = min(steps, train.max_steps_per_epoch)

    data.train.seed = train.seed
    history: List[Dict[str, Any]] = []
    best_score: Optional[float] = None
    best_state = None
    for epoch in range(train.epochs):
        epoch_started = time.time()
        data.train.set_epoch(epoch)
        model.train()
        losses = []
        for arrays in data.train.iter_arrays(max_batches=steps):
            labels = torch.from_numpy(np.ascontiguousarray(arrays.labels, dtype=np.float32)).to(device)
            probabilities = model(feature_dict(arrays, data.preprocessor, device)).clamp(_EPS, 1.0 - _EPS)
            loss = F.binary_cross_entropy(probabilities, labels)  # the mean over B x T is mean_t mean_b
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        seconds = time.time() - epoch_started

        validation = task_metrics(*predict(model, data.validation, data.preprocessor, device), data.tasks)
        score = average_auc(validation)
        history.append({
            "epoch": epoch + 1, "phase": "none", "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "l0": 0.0, "validation": validation, "sparsity": {}, "seconds": seconds,
        })
        logger.info("torch-rechub %s epoch %d/%d: loss %.4f, validation average AUC %s",
                    PEER_MODELS[name], epoch + 1, train.epochs, history[-1]["train_loss"],
                    "n/a" if score is None else f"{score:.4f}")
        if score is not None and (best_score is None or score > best_score):
            best_score, best_state = score, copy.deepcopy(model.state_dict())

    if best_state is not None:
        model.load_state_dict(best_state)
    validation = task_metrics(*predict(model, data.validation, data.preprocessor, device), data.tasks)
    test = task_metrics(*predict(model, data.test, data.preprocessor, device), data.tasks)
    network_mb = network_bytes(model) / BYTES_PER_MB
    return {
        "test": test,
        "validation": validation,
        "best_validation_average_auc": best_score,
        "size_mb": {"deployable": network_mb, "dense_fp32": network_mb, "embeddings": module_fp32_bytes(model.embedding) / BYTES_PER_MB},
        "history": history,
        "wall_seconds": time.time() - started,
    }
