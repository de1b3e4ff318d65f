"""The train job: data, sharded model, the two MoME phases, evaluation and checkpoints.

One path serves one process and many: the model is always wrapped in
DistributedModelParallel, whose embedding tables follow a sharding plan, and
batches always go through TorchRec's TrainPipelineSparseDist.
"""

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from tqdm import tqdm

from mome_rec.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from mome_rec.config import Config
from mome_rec.data.batches import BatchStream
from mome_rec.data.preprocess import Preprocessor
from mome_rec.data.sources import resolve_splits
from mome_rec.distributed import DistEnv, all_reduce_int, barrier
from mome_rec.errors import InputError
from mome_rec.evaluation import evaluate_split
from mome_rec.metrics import average_auc
from mome_rec.model import build_model
from mome_rec.optim import DenseOptimizer, apply_embedding_optimizer, broadcast_parameters, embedding_optimizer_name
from mome_rec.planning import collective_plan
from mome_rec.sizes import size_report
from mome_rec.train_module import TrainModule

logger = logging.getLogger(__name__)


class Trainer:
    """Train one configuration and write ``metrics.json`` to ``out_dir``.

    Args:
        config: the whole job configuration.
        out_dir: run folder for checkpoints, metrics and figures.
        env: this process's rank and device from :func:`mome_rec.distributed.init_distributed`.
        plan: a sharding plan to use instead of planning now.
        resume: a run folder (or checkpoint folder) to continue from.
    """

    def __init__(self, config: Config, out_dir: Path, env: DistEnv, plan=None, resume: Optional[Path] = None) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.env = env
        self.plan = plan
        self.resume = Path(resume) if resume is not None else None
        self.history: list = []

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
        torch.manual_seed(train.seed)
        model = build_model(
            model_cfg, self.preprocessor.table_sizes(), len(self.schema.dense), len(self.tasks),
            device=torch.device("meta"), dense_device=self.env.device,
        )
        self.table_optimizer = embedding_optimizer_name(train.embedding_optimizer, self.env.device)
        apply_embedding_optimizer(model.sparse_arch, self.table_optimizer, train.embedding_lr)
        self.sizes = size_report(model)

        module = TrainModule(model)
        if self.plan is None:
            self.plan = collective_plan(module, self.config, self.env.device, self.env.local_world_size)
        sharding_env = ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD)
        self.dmp = DistributedModelParallel(
            module, env=sharding_env, device=self.env.device, plan=self.plan, init_data_parallel=False
        )
        self.ranking_model = self.dmp.module.model
        broadcast_parameters(self.ranking_model.task_arch)
        self._build_dense_optimizer()

    def _dense_parameters(self):
        return list(self.ranking_model.task_arch.parameters())

    def _build_dense_optimizer(self) -> None:
        self.dense_optimizer = DenseOptimizer(self._dense_parameters(), lr=self.config.train.lr)

    # ----------------------------------------------------------- checkpoints

    def _state(self) -> Dict[str, Any]:
        return {
            "model": self.dmp.state_dict(),
            "dense_optimizer": self.dense_optimizer.state_dict(),
            "table_optimizer": self.dmp.fused_optimizer.state_dict(),
        }

    def _meta(self, epoch: int, step: int, best: Optional[float]) -> Dict[str, Any]:
        return {
            "epoch": epoch,
            "step": step,
            "global_step": self.global_step,
            "best_validation_auc": best,
            "structure": self.ranking_model.over_arch.structure_state(),
            "preprocessor": self.preprocessor.to_dict(),
            "config": self.config.to_dict(),
            "world_size": self.env.world_size,
            "history": self.history,
        }

    def _restore(self, path: Path) -> Dict[str, Any]:
        meta = read_meta(path)
        over_arch = self.ranking_model.over_arch
        over_arch.load_structure_state(meta["structure"])
        self._build_dense_optimizer()
        state = self._state()
        load_checkpoint(path, state)
        self.dmp.load_state_dict(state["model"])
        self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        self.dmp.fused_optimizer.load_state_dict(state["table_optimizer"])
        return meta

    # ------------------------------------------------------------- training

    def _maybe_switch_phase(self, epoch: int) -> None:
        over_arch = self.ranking_model.over_arch
        if over_arch.wants_phase_switch and over_arch.phase == "neuron" and epoch >= self.config.train.neuron_epochs:
            over_arch.start_expert_phase()
            self._build_dense_optimizer()
            logger.info("epoch %d: neuron masks frozen and pruned; learning the expert masks", epoch + 1)

    def _checkpoint_eligible(self) -> bool:
        """Only the final structure is kept as best: a neuron-phase model is not the deployed MoME."""
        over_arch = self.ranking_model.over_arch
        return not (over_arch.wants_phase_switch and over_arch.phase == "neuron")

    def _train_epoch(self, epoch: int, skip_steps: int, best: Optional[float]) -> float:
        train = self.config.train
        self.train_stream.set_epoch(epoch)
        batches = self.train_stream.iterate(skip_batches=skip_steps, max_batches=self.steps_per_epoch - skip_steps)
        pipeline = TrainPipelineSparseDist(self.dmp, self.dense_optimizer, self.env.device)
        self.dmp.train()
        iterator = iter(batches)
        losses = []
        bar = tqdm(
            total=self.steps_per_epoch, initial=skip_steps, desc=f"epoch {epoch + 1}/{train.epochs}",
            disable=not self.env.is_main, leave=False,
        )
        step = skip_steps
        while True:
            try:
                loss, _, _ = pipeline.progress(iterator)
            except StopIteration:
                break
            losses.append(float(loss))
            step += 1
            self.global_step += 1
            bar.update(1)
            if train.checkpoint_every_steps and self.global_step % train.checkpoint_every_steps == 0:
                # A mid-epoch checkpoint records the next step to run; the batches already in the
                # pipeline's queue are read again after a resume, in the same order.
                save_checkpoint(self.out_dir / "checkpoints" / "latest", self._state(), self._meta(epoch, step, best))
        bar.close()
        pipeline.detach()
        return float(np.mean(losses)) if losses else float("nan")

    def run(self) -> Dict[str, Any]:
        """Train, keep the best checkpoint by validation average AUC, test it, write metrics.json."""
        started = time.time()
        train = self.config.train
        self._prepare_data()
        self._build_model()
        created = not self.out_dir.exists()
        try:
            return self._run(started)
        except InputError:
            if created and self.env.is_main:
                import shutil

                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise

    def _run(self, started: float) -> Dict[str, Any]:
        train = self.config.train
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        barrier()

        start_epoch, skip_steps, best = 0, 0, None
        self.global_step = 0
        checkpoint = self._resume_point()
        if checkpoint is not None:
            meta = self._restore(checkpoint)
            start_epoch, skip_steps, best = meta["epoch"], meta["step"], meta["best_validation_auc"]
            self.global_step = meta["global_step"]
            self.history = meta.get("history", [])
            if skip_steps >= self.steps_per_epoch:
                start_epoch, skip_steps = start_epoch + 1, 0
            logger.info("resuming from %s at epoch %d step %d", checkpoint, start_epoch + 1, skip_steps)

        best_path = self.out_dir / "checkpoints" / "best"
        for epoch in range(start_epoch, train.epochs):
            self._maybe_switch_phase(epoch)
            epoch_started = time.time()
            train_loss = self._train_epoch(epoch, skip_steps, best)
            seconds = time.time() - epoch_started
            skip_steps = 0

            validation = evaluate_split(self.dmp, self.validation_stream, self.env, self.tasks, "validation")
            score = average_auc(validation)
            over_arch = self.ranking_model.over_arch
            regularization = float(over_arch.regularization().detach())
            record = {
                "epoch": epoch + 1,
                "phase": over_arch.phase,
                "train_loss": train_loss,
                "l0": regularization,
                "validation": validation,
                "sparsity": over_arch.sparsity(),
                "seconds": seconds,
            }
            self.history.append(record)
            self._log_epoch(record, seconds)

            if self._checkpoint_eligible() and score is not None and (best is None or score > best):
                best = score
                save_checkpoint(best_path, self._state(), self._meta(epoch, self.steps_per_epoch, best))
            save_checkpoint(self.out_dir / "checkpoints" / "latest", self._state(), self._meta(epoch, self.steps_per_epoch, best))

        if (best_path / "meta.json").is_file():
            self._restore(best_path)
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

    def _resume_point(self) -> Optional[Path]:
        if self.resume is None:
            return None
        if (self.resume / "meta.json").is_file():
            return self.resume
        found = latest_checkpoint(self.resume)
        if found is None:
            raise InputError(f"--resume {self.resume}: no complete checkpoint found (expected checkpoints/latest/meta.json)")
        return found

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


def format_sparsity(sparsity: Dict[str, Any]) -> str:
    """One short phrase: mean neuron-mask zero fraction and mean expert-mask zero fraction."""
    pieces = []
    neuron = sparsity.get("neuron") or {}
    if neuron:
        pieces.append(f"neuron zeros {100 * float(np.mean(list(neuron.values()))):.1f}%")
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
