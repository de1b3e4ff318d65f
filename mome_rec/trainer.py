"""The train job: data, sharded model, the two MoME phases, evaluation and checkpoints.

One path serves one process and many: the model is always wrapped in
DistributedModelParallel, whose embedding tables follow a sharding plan, and
batches always go through TorchRec's TrainPipelineSparseDist. Every rank reads
a disjoint share of each split (see :mod:`mome_rec.data.batches`), runs the
same number of steps per epoch, and switches MoME's phase at the same epoch.

``checkpoints/latest`` is written every ``train.checkpoint_every_steps`` steps
and at each epoch end, ``checkpoints/best`` for the best validation average
AUC. A checkpoint contains the model, the three optimizer states and every
rank's random number generator state. Its ``meta.json`` adds the phase
(``structure``), the epoch, the steps trained and what rebuilding the model
elsewhere needs.
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from tqdm import tqdm

from mome_rec.checkpoint import (
    capture_rng_state,
    checkpoint_keys,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    read_rank_state,
    restore_rng_state,
    save_checkpoint,
)
from mome_rec.config import Config
from mome_rec.data.batches import BatchStream
from mome_rec.data.preprocess import Preprocessor
from mome_rec.data.sources import resolve_splits
from mome_rec.distributed import DistEnv, all_reduce_int, barrier
from mome_rec.errors import InputError
from mome_rec.evaluation import evaluate_split
from mome_rec.metrics import average_auc
from mome_rec.model import build_model
from mome_rec.optim import (
    DenseOptimizer,
    OptimizerChain,
    apply_embedding_optimizer,
    broadcast_parameters,
    build_table_optimizer,
    embedding_optimizer_name,
    optimizer_state,
    replicated_table_parameters,
)
from mome_rec.plan_io import SavedPlan, check_table_rows
from mome_rec.planning import collective_plan
from mome_rec.sizes import size_report
from mome_rec.train_loop import StepLog, train_epoch
from mome_rec.train_module import TrainModule

logger = logging.getLogger(__name__)


def rank_seed(seed: int, rank: int) -> int:
    """Return the torch seed of ``rank`` for dropout and mask noise, distinct per rank and fixed by ``seed``."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class Trainer:
    """Train one configuration and write ``metrics.json`` and ``steps.jsonl`` to ``out_dir``.

    Args:
        config: the whole job configuration.
        out_dir: run folder for checkpoints, metrics and the step log.
        env: this process's rank and device from :func:`mome_rec.distributed.init_distributed`.
        plan: a sharding plan to use instead of planning now: a :class:`~mome_rec.plan_io.SavedPlan`
            (checked against the table sizes) or a TorchRec ShardingPlan.
        resume: a run folder (or checkpoint folder) to continue from.
    """

    def __init__(self, config: Config, out_dir: Path, env: DistEnv, plan=None, resume: Optional[Path] = None) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.env = env
        self.plan = plan
        self.resume = Path(resume) if resume is not None else None
        self.history: list = []
        self.global_step = 0
        self.step_log = StepLog(self.out_dir / "steps.jsonl", enabled=env.is_main)

    # ----------------------------------------------------------------- set-up

    def _prepare_data(self) -> None:
        data, train = self.config.data, self.config.train
        splits = resolve_splits(data)
        self.schema = splits.schema
        self.tasks = list(self.schema.labels)
        self.preprocessor = Preprocessor.fit(splits.train, self.schema, holdout=splits.holdout, read_rows=data.read_batch_rows)
        stream_args = dict(rank=self.env.rank, world_size=self.env.world_size, read_rows=data.read_batch_rows)
        self.train_stream = BatchStream(
            splits.train, self.preprocessor, train.batch_size, split="train", shuffle=True, seed=train.seed,
            holdout=splits.holdout, shuffle_buffer_rows=data.shuffle_buffer_rows, **stream_args,
        )
        if splits.validation:
            self.validation_stream = BatchStream(splits.validation, self.preprocessor, train.eval_batch_size, split="eval", **stream_args)
        else:
            self.validation_stream = BatchStream(
                splits.train, self.preprocessor, train.eval_batch_size, split="eval", holdout=splits.holdout, **stream_args
            )
        self.test_stream = BatchStream(splits.test, self.preprocessor, train.eval_batch_size, split="eval", **stream_args)

        steps = all_reduce_int(len(self.train_stream), "min")
        if train.max_steps_per_epoch is not None:
            steps = min(steps, train.max_steps_per_epoch)
        if steps == 0:
            raise InputError(
                f"train split: {self.train_stream.num_rows()} rows on rank {self.env.rank} is less than one batch "
                f"(train.batch_size={train.batch_size})"
            )
        self.steps_per_epoch = steps

    def _build_model(self) -> None:
        model_cfg, train = self.config.model, self.config.train
        table_sizes = self.preprocessor.table_sizes()
        torch.manual_seed(train.seed)
        model = build_model(
            model_cfg, table_sizes, len(self.schema.dense), len(self.tasks),
            device=torch.device("meta"), dense_device=self.env.device,
        )
        self.table_optimizer = embedding_optimizer_name(train.embedding_optimizer, self.env.device)
        apply_embedding_optimizer(model.sparse_arch, self.table_optimizer, train.embedding_lr)
        self.sizes = size_report(model)

        module = TrainModule(model)
        self.dmp = DistributedModelParallel(
            module, env=ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD), device=self.env.device,
            plan=self._sharding_plan(module, table_sizes), init_data_parallel=False,
        )
        self.ranking_model = self.dmp.module.model
        if self.env.is_main:
            logger.info("sharding: %s", describe_plan(self.dmp.plan))
        broadcast_parameters(self.ranking_model.task_arch)
        # Every rank built the same initial weights from train.seed; from here on, dropout and
        # mask noise draw from a different stream on each rank.
        torch.manual_seed(rank_seed(train.seed, self.env.rank))

        self.replicated_tables = replicated_table_parameters(self.dmp)
        self.replicated_table_optimizer = build_table_optimizer(
            self.table_optimizer, list(self.replicated_tables.values()), train.embedding_lr
        )
        self._build_dense_optimizer()

    def _sharding_plan(self, module: TrainModule, table_sizes: Dict[str, int]) -> ShardingPlan:
        if self.plan is None:
            return collective_plan(module, self.config, self.env.device, self.env.local_world_size, list(table_sizes))
        if isinstance(self.plan, SavedPlan):
            check_table_rows(self.plan, table_sizes)
            return self.plan.sharding_plan
        return self.plan

    def _build_dense_optimizer(self) -> None:
        """(Re)build Adam on the dense part, needed again after the phase switch replaces its parameters."""
        task_arch = self.ranking_model.task_arch
        train = self.config.train
        masks = [param for name, param in task_arch.named_parameters() if name.endswith("mask_mu")]
        self.dense_optimizer = DenseOptimizer(
            task_arch.parameters(), lr=train.lr, buffers=task_arch.buffers(), mask_params=masks, mask_lr=train.mask_lr
        )
        self.optimizer = OptimizerChain([self.dense_optimizer, self.replicated_table_optimizer])

    # ----------------------------------------------------------- checkpoints

    def _state(self) -> Dict[str, Any]:
        """Return the DCP state: model, fused table optimizer, data_parallel table optimizer, dense Adam."""
        dense_params = {f"model.task_arch.{name}": param for name, param in self.ranking_model.task_arch.named_parameters()}
        return {
            "model": self.dmp.state_dict(),
            "table_optimizer": self.dmp.fused_optimizer.state_dict(),
            "replicated_table_optimizer": optimizer_state(self.replicated_table_optimizer, self.replicated_tables),
            "dense_optimizer": optimizer_state(self.dense_optimizer.adam, dense_params),
        }

    def _meta(self, epoch: int, step: int, best: Optional[float]) -> Dict[str, Any]:
        return {
            "epoch": epoch,
            "step": step,
            "steps_per_epoch": self.steps_per_epoch,
            "global_step": self.global_step,
            "best_validation_auc": best,
            "structure": self.ranking_model.over_arch.structure_state(),
            "preprocessor": self.preprocessor.to_dict(),
            "config": self.config.to_dict(),
            "world_size": self.env.world_size,
            "table_optimizer": self.table_optimizer,
            "history": self.history,
        }

    def _save(self, path: Path, epoch: int, step: int, best: Optional[float]) -> None:
        save_checkpoint(path, self._state(), self._meta(epoch, step, best), rank_state={"rng": capture_rng_state()})

    def _restore(self, path: Path, model_only: bool = False) -> Dict[str, Any]:
        """Load a checkpoint written by any world size; optimizer entries it lacks keep their values."""
        meta = read_meta(path)
        self.ranking_model.over_arch.load_structure_state(meta["structure"])
        self._build_dense_optimizer()
        state = {"model": self.dmp.state_dict()} if model_only else self._state()
        available = checkpoint_keys(path)
        missing_model = [key for key in state["model"] if f"model.{key}" not in available]
        if missing_model:
            raise InputError(f"{path}: checkpoint has no {missing_model[0]} (saved from a different model config?)")
        load_checkpoint(path, state, partial=True)
        self.dmp.load_state_dict(state["model"])
        if not model_only:
            self.dmp.fused_optimizer.load_state_dict(state["table_optimizer"])
            _warn_missing_optimizer_state(path, state, available)
        return meta

    def _resume_point(self) -> Optional[Path]:
        if self.resume is None:
            return None
        found = find_checkpoint(self.resume) or latest_checkpoint(self.resume)
        if found is None:
            raise InputError(f"--resume {self.resume}: no complete checkpoint found (expected checkpoints/latest/meta.json)")
        return found

    def _resume(self, checkpoint: Path) -> tuple:
        """Restore ``checkpoint`` and return ``(epoch, steps already trained in it, best validation AUC)``."""
        meta = self._restore(checkpoint)
        epoch, step, best = meta["epoch"], meta["step"], meta["best_validation_auc"]
        self.global_step = meta["global_step"]
        self.history = meta.get("history", [])
        saved_world_size = meta.get("world_size", self.env.world_size)
        saved_steps = meta.get("steps_per_epoch", self.steps_per_epoch)

        if step >= saved_steps:
            epoch, step = epoch + 1, 0
        elif saved_world_size != self.env.world_size:
            # The rows move to other ranks, so only the fraction of the epoch done carries over.
            step = min(round(step * self.steps_per_epoch / saved_steps), self.steps_per_epoch)
            logger.warning("checkpoint written by %d ranks: continuing epoch %d at step %d of %d, an approximate position",
                           saved_world_size, epoch + 1, step, self.steps_per_epoch)

        rank_state = read_rank_state(checkpoint, self.env.rank) if saved_world_size == self.env.world_size else None
        if rank_state is not None:
            restore_rng_state(rank_state["rng"])
        elif self.env.is_main:
            logger.warning("%s: no random number generator state for this world size; using fresh seeds", checkpoint)
        self.step_log.truncate(self.global_step)
        if self.env.is_main:
            logger.info("resuming from %s at epoch %d step %d", checkpoint, epoch + 1, step)
        return epoch, step, best

    # ------------------------------------------------------------- training

    def _maybe_switch_phase(self, epoch: int) -> None:
        """Run MoME's phase switch at the start of epoch ``train.neuron_epochs`` (0-based), on every rank."""
        over_arch = self.ranking_model.over_arch
        if over_arch.wants_phase_switch and over_arch.phase == "neuron" and epoch >= self.config.train.neuron_epochs:
            over_arch.start_expert_phase()
            # The replicas are identical, so they prune the same neurons. The broadcast rules out any drift.
            broadcast_parameters(self.ranking_model.task_arch)
            self._build_dense_optimizer()
            if self.env.is_main:
                logger.info("epoch %d: neuron masks frozen and pruned; learning the expert masks", epoch + 1)

    def _checkpoint_eligible(self) -> bool:
        """Only the final structure is kept as best: a neuron-phase model is not the deployed MoME."""
        over_arch = self.ranking_model.over_arch
        return not (over_arch.wants_phase_switch and over_arch.phase == "neuron")

    def _train_epoch(self, epoch: int, first_step: int, best: Optional[float]) -> float:
        train = self.config.train
        self.train_stream.set_epoch(epoch)
        batches = self.train_stream.iterate(skip_batches=first_step, max_batches=self.steps_per_epoch - first_step)
        step = first_step
        phase = self.ranking_model.over_arch.phase

        def on_step(loss: float) -> None:
            nonlocal step
            step += 1
            self.global_step += 1
            self.step_log.append({"epoch": epoch + 1, "step": step, "global_step": self.global_step, "phase": phase, "loss": loss})
            # The epoch-end checkpoint follows the last step, after validation.
            every = train.checkpoint_every_steps
            if every and self.global_step % every == 0 and step < self.steps_per_epoch:
                self._save(self.out_dir / "checkpoints" / "latest", epoch, step, best)

        progress = tqdm(
            total=self.steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{train.epochs}",
            disable=not self.env.is_main, leave=False,
        )
        with progress:
            losses = train_epoch(self.dmp, self.optimizer, batches, self.env.device, on_step, progress)
        return float(np.mean(losses)) if losses else float("nan")

    def run(self) -> Dict[str, Any]:
        """Train, keep the best checkpoint by validation average AUC, test it, write metrics.json."""
        started = time.time()
        self._prepare_data()
        self._build_model()
        created = not self.out_dir.exists()
        try:
            return self._run(started)
        except InputError:
            if created and self.env.is_main:
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise

    def _run(self, started: float) -> Dict[str, Any]:
        train = self.config.train
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        barrier()

        start_epoch, first_step, best = 0, 0, None
        checkpoint = self._resume_point()
        if checkpoint is not None:
            start_epoch, first_step, best = self._resume(checkpoint)

        best_path = self.out_dir / "checkpoints" / "best"
        for epoch in range(start_epoch, train.epochs):
            self._maybe_switch_phase(epoch)
            epoch_started = time.time()
            train_loss = self._train_epoch(epoch, first_step, best)
            seconds = time.time() - epoch_started
            first_step = 0

            validation = evaluate_split(self.dmp, self.validation_stream, self.env, self.tasks, "validation")
            score = average_auc(validation)
            over_arch = self.ranking_model.over_arch
            record = {
                "epoch": epoch + 1,
                "phase": over_arch.phase,
                "train_loss": train_loss,
                "l0": float(over_arch.regularization().detach()),
                "validation": validation,
                "sparsity": over_arch.sparsity(),
                "seconds": seconds,
            }
            self.history.append(record)
            self._log_epoch(record, seconds)

            if self._checkpoint_eligible() and score is not None and (best is None or score > best):
                best = score
                self._save(best_path, epoch, self.steps_per_epoch, best)
            self._save(self.out_dir / "checkpoints" / "latest", epoch, self.steps_per_epoch, best)

        return self._finish(started, best, best_path)

    def _finish(self, started: float, best: Optional[float], best_path: Path) -> Dict[str, Any]:
        """Test the best checkpoint (or the last model) and write metrics.json."""
        if find_checkpoint(best_path) is not None:
            self._restore(find_checkpoint(best_path), model_only=True)
        else:
            logger.warning("no epoch gave a defined validation AUC; testing the last model")
        validation = evaluate_split(self.dmp, self.validation_stream, self.env, self.tasks, "validation")
        test = evaluate_split(self.dmp, self.test_stream, self.env, self.tasks, "test")
        over_arch = self.ranking_model.over_arch
        metrics = {
            "test": test,
            "validation": validation,
            "best_validation_average_auc": best,
            "sparsity": over_arch.sparsity(),
            "size_mb": {**size_report(self.ranking_model, embeddings_mb=self.sizes["embeddings"])},
            "phase": over_arch.phase,
            "table_optimizer": self.table_optimizer,
            "world_size": self.env.world_size,
            "global_steps": self.global_step,
            "wall_seconds": time.time() - started,
            "history": self.history,
        }
        if self.env.is_main:
            write_json(self.out_dir / "metrics.json", metrics)
            summary = ", ".join(f"{task} AUC {values['auc']:.4f}" if values["auc"] is not None else f"{task} AUC n/a"
                                for task, values in test.items())
            logger.info("test: %s; deployable %.2f MB; wrote %s", summary, metrics["size_mb"]["deployable"],
                        self.out_dir / "metrics.json")
        barrier()
        return metrics

    def _log_epoch(self, record: Dict[str, Any], seconds: float) -> None:
        if not self.env.is_main:
            return
        parts = []
        for task, values in record["validation"].items():
            auc = "n/a" if values["auc"] is None else f"{values['auc']:.4f}"
            parts.append(f"{task} AUC {auc} logloss {values['logloss']:.4f}")
        rows = self.steps_per_epoch * self.config.train.batch_size * self.env.world_size
        logger.info(
            "epoch %d/%d [%s] loss %.4f L0 %.4g | validation %s | %s | %.0f samples/s",
            record["epoch"], self.config.train.epochs, record["phase"], record["train_loss"], record["l0"],
            "; ".join(parts), format_sparsity(record["sparsity"]), rows / max(seconds, 1e-9),
        )


def _warn_missing_optimizer_state(path: Path, state: Dict[str, Any], available) -> None:
    """Log the optimizer entries a checkpoint lacked, e.g. a table sharded differently when it was saved."""
    missing = []
    for section in ("replicated_table_optimizer", "dense_optimizer"):
        for name, values in state[section].items():
            if any(f"{section}.{name}.{key}" not in available for key in values):
                missing.append(name)
    for name, values in state["table_optimizer"].get("state", {}).items():
        if any(f"table_optimizer.state.{name}.{key}" not in available for key in values):
            missing.append(name)
    if missing and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        logger.warning("%s: no optimizer state for %s; it starts from zero", path, ", ".join(sorted(set(missing))))


def describe_plan(plan: ShardingPlan) -> str:
    """Return one line naming each table's sharding type, compute kernel and ranks, grouped by the first two."""
    groups: Dict[str, list] = {}
    for module_plan in plan.plan.values():
        for name, sharding in module_plan.items():
            ranks = sharding.ranks or []
            where = "" if sharding.sharding_type == "data_parallel" else f" on {','.join(map(str, ranks))}"
            groups.setdefault(f"{sharding.sharding_type}/{sharding.compute_kernel}", []).append(f"{name}{where}")
    return "; ".join(f"{group}: {', '.join(tables)}" for group, tables in sorted(groups.items()))


def format_sparsity(sparsity: Dict[str, Any]) -> str:
    """Return one short phrase: each layer's neuron-mask zero fraction and the mean expert-mask zero fraction."""
    pieces = []
    neuron = sparsity.get("neuron") or {}
    if neuron:
        pieces.append("neuron zeros per layer " + " / ".join(f"{100 * float(value):.1f}%" for value in neuron.values()))
    experts = sparsity.get("experts") or []
    if experts:
        pieces.append(f"expert zeros {100 * float(np.mean([e['zero'] for e in experts])):.1f}%")
    return ", ".join(pieces) or "no masks"


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to a temporary name, then rename it to ``path``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(value, indent=2, default=float))
    os.replace(tmp, path)
