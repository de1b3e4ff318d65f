"""Train several over-arches on one split and write the comparison table and figures.

For every model and seed the trainer runs with ``model.over_arch`` set to the
model and ``train.seed`` set to ``config.train.seed + k`` (k = 0 .. seeds - 1);
the data split does not depend on the seed. The MoME variants with masks get
their L0 weights from a grid search on the first seed, scored by the
validation average AUC, never by the test split:

* ``mome``: lambda_1 = lambda_2 = each grid value (tied, one run per value);
* ``mome_n``: lambda_1 over the grid (it has no expert masks);
* ``mome_w``: lambda_2 over the grid (it has no neuron masks).

The run of the chosen value is the first seed's run, and the other seeds reuse
that value. A tie goes to the grid value listed first. The output folder holds::

    results.md, results.csv, results.json    the table and every run's numbers
    figures/                                 ablation, AUC against size, MoME's convergence and mask values
    runs/MODEL[/lambda1-A-lambda2-B]/seedK/  each trainer run (metrics.json, record.json, figures/)
    peers/MODEL/seedK/record.json            each torch-rechub run

A run folder whose ``record.json`` was written for the same configuration is
reused, so an interrupted comparison continues where it stopped.
"""

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mome_rec.config import Config
from mome_rec.errors import ConfigError
from mome_rec.figures import ABLATION_VARIANTS, ablation_figure, auc_size_figure, convergence_figure, expert_mask_histogram
from mome_rec.figures import mask_values_figure, write_run_figures
from mome_rec.metrics import average_auc
from mome_rec.modules.over_arch import OVER_ARCHS
from mome_rec.peers import PEER_MODELS, RECHUB_VERSION, rechub_version
from mome_rec.results_table import Row, csv_table, markdown_table, row_to_dict, summarize_row

logger = logging.getLogger(__name__)

ALL_MODELS: Tuple[str, ...] = (
    "single_task", "shared_bottom", "moe", "mmoe", "cgc", "ple", "aitm", "base", "mome_n", "mome_w", "mome",
)
"""``--models all``, in table order: the baselines, then the MoME ablations from no masks to both."""

LAMBDA_GRID: Tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-6)
"""The L0 weights searched for lambda_1 and lambda_2, those of the MoME paper."""

SEARCHED_LAMBDAS: Dict[str, str] = {"mome": "tied", "mome_n": "neuron", "mome_w": "expert"}
"""Model -> which lambdas the grid search sets: both to one value, lambda_1 only or lambda_2 only."""

MASK_MODELS = ("mome", "mome_w")
"""Models whose trained expert masks are drawn."""

TrainFunction = Callable[[Config, Path], Dict[str, Any]]
"""Trains one config into a run folder and returns the trainer's metrics dict."""

PeerFunction = Callable[[str, Config], Dict[str, Any]]
"""Trains the torch-rechub peer of a model name and returns metrics shaped like the trainer's."""


# --------------------------------------------------------------- arguments


def parse_models(spec: str) -> List[str]:
    """Return the models of ``--models``: ``all`` or a comma-separated list of registered over-arches."""
    if spec.strip() == "all":
        return list(ALL_MODELS)
    models = [name.strip() for name in spec.split(",") if name.strip()]
    for name in models:
        if name not in OVER_ARCHS:
            raise ConfigError(f"--models: unknown over-arch {name!r} (known: all, {', '.join(sorted(OVER_ARCHS))})")
    if not models:
        raise ConfigError("--models: name at least one over-arch, or all")
    return list(dict.fromkeys(models))


def parse_peers(spec: str) -> List[str]:
    """Return the peers of ``--peers``: ``all``, ``none`` or a comma-separated subset of :data:`PEER_MODELS`."""
    if spec.strip() == "all":
        return list(PEER_MODELS)
    if spec.strip() == "none":
        return []
    peers = [name.strip() for name in spec.split(",") if name.strip()]
    for name in peers:
        if name not in PEER_MODELS:
            raise ConfigError(f"--peers: no torch-rechub peer for {name!r} (known: all, none, {', '.join(PEER_MODELS)})")
    return list(dict.fromkeys(peers))


def parse_lambda_grid(text: str) -> List[float]:
    """Return the comma-separated L0 weights of ``--lambda-grid``; each must be a non-negative number."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--lambda-grid: {item!r} is not a number (expected e.g. 1e-2,1e-3,1e-4,1e-6)") from None
        if value < 0 or value != value:
            raise ConfigError(f"--lambda-grid: {item!r} must be a non-negative number")
        values.append(value)
    return values


def lambda_candidates(model: str, grid: Sequence[float], config: Config) -> List[Tuple[float, float]]:
    """Return the ``(lambda_1, lambda_2)`` pairs to try for ``model``; one pair from the config when not searched."""
    fixed = (config.model.lambda_neuron, config.model.lambda_expert)
    kind = SEARCHED_LAMBDAS.get(model)
    if kind is None or not grid:
        return [fixed]
    if kind == "tied":
        return [(value, value) for value in grid]
    if kind == "neuron":
        return [(value, fixed[1]) for value in grid]
    return [(fixed[0], value) for value in grid]


def shown_lambdas(model: str, lambda_neuron: float, lambda_expert: float) -> Tuple[Optional[float], Optional[float]]:
    """Return the lambdas that act in ``model`` (None for a mask it does not have)."""
    if model == "mome":
        return lambda_neuron, lambda_expert
    if model == "mome_n":
        return lambda_neuron, None
    if model == "mome_w":
        return None, lambda_expert
    return None, None


# ------------------------------------------------------------------ records


def run_record(
    model: str, seed: int, lambda_neuron: float, lambda_expert: float, metrics: Dict[str, Any], run_dir: Path
) -> Dict[str, Any]:
    """Return the JSON-serialisable summary of one run that the table and figures need.

    ``train_seconds`` sums the epochs' training time (without evaluation);
    ``size_mb`` is the deployed size of the network above the embeddings.
    """
    history = metrics.get("history") or []
    return {
        "model": model,
        "seed": seed,
        "lambda_neuron": lambda_neuron,
        "lambda_expert": lambda_expert,
        "run_dir": str(run_dir),
        "test": metrics["test"],
        "validation": metrics["validation"],
        "test_average_auc": average_auc(metrics["test"]),
        "validation_average_auc": average_auc(metrics["validation"]),
        "size_mb": metrics["size_mb"]["deployable"],
        "dense_fp32_mb": metrics["size_mb"].get("dense_fp32"),
        "embeddings_mb": metrics["size_mb"].get("embeddings"),
        "train_seconds": float(sum(record.get("seconds", 0.0) for record in history)),
        "wall_seconds": metrics.get("wall_seconds"),
        "sparsity": metrics.get("sparsity", {}),
        "mask_histogram": metrics.get("mask_histogram"),
        "history": history,
    }


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name in the same folder, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp"
    temporary.write_text(text)
    os.replace(temporary, path)


def _read_reusable(run_dir: Path, config: Config) -> Optional[Dict[str, Any]]:
    path = run_dir / "record.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s: unreadable record, training again", path)
        return None
    if stored.get("config") != json.loads(json.dumps(config.to_dict())):
        logger.info("%s: written for another configuration, training again", path)
        return None
    return stored["record"]


# --------------------------------------------------------------- comparison


class Comparison:
    """Train every model for every seed (and the lambda grid), then write the table and figures.

    Args:
        config: the base configuration; ``model.over_arch``, the lambdas and
            ``train.seed`` are set per run.
        out_dir: the output folder (see the module docstring).
        models: over-arch names, in table order.
        seeds: number of seeds per model.
        train_fn: trains one config into a run folder and returns the trainer's metrics.
        lambda_grid: L0 weights to search for the MoME variants; empty keeps the config's.
        peers: mome_rec names whose torch-rechub peers to train (keys of :data:`PEER_MODELS`).
        peer_fn: trains a peer; defaults to :func:`mome_rec.peers.train_peer`.
        dataset: the data set's name in figures and the report.
        keep_checkpoints: keep each run's checkpoints; by default they are
            deleted once the run's record is written.
        run_figures: write each run's own figures into its run folder.
        command: the command line, recorded in the report.
    """

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        models: Sequence[str],
        seeds: int,
        train_fn: TrainFunction,
        *,
        lambda_grid: Sequence[float] = LAMBDA_GRID,
        peers: Sequence[str] = tuple(PEER_MODELS),
        peer_fn: Optional[PeerFunction] = None,
        dataset: str = "data",
        keep_checkpoints: bool = False,
        run_figures: bool = True,
        command: str = "",
    ) -> None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {seeds}")
        self.config = config
        self.out_dir = Path(out_dir)
        self.models = list(models)
        self.seeds = seeds
        self.train_fn = train_fn
        self.lambda_grid = list(lambda_grid)
        self.peers = list(peers)
        self.peer_fn = peer_fn
        self.dataset = dataset
        self.keep_checkpoints = keep_checkpoints
        self.run_figures = run_figures
        self.command = command
        self.tasks: List[str] = list(config.data.schema.labels)

    # ------------------------------------------------------------ one run

    def _config_for(self, model: str, seed: int, lambda_neuron: float, lambda_expert: float) -> Config:
        config = copy.deepcopy(self.config)
        config.model.over_arch = model
        config.model.lambda_neuron = lambda_neuron
        config.model.lambda_expert = lambda_expert
        config.train.seed = seed
        return config

    def _train(self, model: str, seed: int, lambdas: Tuple[float, float], run_dir: Path) -> Dict[str, Any]:
        config = self._config_for(model, seed, *lambdas)
        reused = _read_reusable(run_dir, config)
        if reused is not None:
            logger.info("%s seed %d: reusing %s", model, seed, run_dir)
            return reused

        metrics = self.train_fn(config, run_dir)
        if model in MASK_MODELS and metrics.get("mask_histogram") is None:
            metrics = dict(metrics, mask_histogram=_checkpoint_mask_histogram(run_dir))
        shown = shown_lambdas(model, *lambdas)
        if self.run_figures:
            name = f"{model} (λ1 {_lambda_text(shown[0])}, λ2 {_lambda_text(shown[1])}, seed {seed})"
            write_run_figures(run_dir, metrics, name=name)
        record = run_record(model, seed, *lambdas, metrics, run_dir)
        write_text(run_dir / "record.json", json.dumps({"config": config.to_dict(), "record": record}, indent=2, default=float))
        if not self.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        logger.info(
            "%s (λ1 %s, λ2 %s) seed %d: validation average AUC %s, test average AUC %s, %.3f MB, %.0f s training",
            model, _lambda_text(shown[0]), _lambda_text(shown[1]), seed, _format_auc(record["validation_average_auc"]),
            _format_auc(record["test_average_auc"]), record["size_mb"], record["train_seconds"],
        )
        return record

    def _run_dir(self, model: str, seed_index: int, lambdas: Optional[Tuple[float, float]]) -> Path:
        folder = self.out_dir / "runs" / model
        if lambdas is not None:
            folder = folder / f"lambda1-{lambdas[0]:g}-lambda2-{lambdas[1]:g}"
        return folder / f"seed{seed_index}"

    def _train_model(self, model: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """Return the model's records (one per seed) and its grid-search trials."""
        base_seed = self.config.train.seed
        candidates = lambda_candidates(model, self.lambda_grid, self.config)
        searched = model in SEARCHED_LAMBDAS and bool(self.lambda_grid)

        trials: List[Dict[str, Any]] = []
        if searched:
            for lambdas in candidates:
                record = self._train(model, base_seed, lambdas, self._run_dir(model, 0, lambdas))
                trials.append(record)
            chosen = max(trials, key=lambda record: _score(record["validation_average_auc"]))
            lambdas = (chosen["lambda_neuron"], chosen["lambda_expert"])
            logger.info("%s: chose λ1=%g λ2=%g by validation average AUC %s", model, *lambdas,
                        _format_auc(chosen["validation_average_auc"]))
            records = [chosen]
        else:
            lambdas = candidates[0]
            records = []
        for index in range(len(records), self.seeds):
            run_dir = self._run_dir(model, index, lambdas if searched else None)
            records.append(self._train(model, base_seed + index, lambdas, run_dir))
        search = [
            {key: trial[key] for key in ("lambda_neuron", "lambda_expert", "validation_average_auc", "test_average_auc", "run_dir")}
            for trial in trials
        ]
        return records, search

    def _train_peer(self, name: str, index: int) -> Dict[str, Any]:
        seed = self.config.train.seed + index
        config = self._config_for(name, seed, self.config.model.lambda_neuron, self.config.model.lambda_expert)
        run_dir = self.out_dir / "peers" / name / f"seed{index}"
        reused = _read_reusable(run_dir, config)
        if reused is not None:
            logger.info("torch-rechub %s seed %d: reusing %s", PEER_MODELS[name], seed, run_dir)
            return reused
        metrics = self.peer_fn(name, config)
        record = run_record(f"torch-rechub {PEER_MODELS[name]}", seed, 0.0, 0.0, metrics, run_dir)
        write_text(run_dir / "record.json", json.dumps({"config": config.to_dict(), "record": record}, indent=2, default=float))
        logger.info("torch-rechub %s seed %d: test average AUC %s, %.3f MB", PEER_MODELS[name], seed,
                    _format_auc(record["test_average_auc"]), record["size_mb"])
        return record

    # ------------------------------------------------------------- the whole

    def run(self) -> Dict[str, Any]:
        """Train everything, write results.md, results.csv, results.json and the figures; return the JSON document."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        records: Dict[str, List[Dict[str, Any]]] = {}
        searches: Dict[str, List[Dict[str, Any]]] = {}
        for model in self.models:
            records[model], search = self._train_model(model)
            if search:
                searches[model] = search
            if not self.tasks:
                # A synthetic config leaves data.schema.labels empty; the runs name the tasks.
                self.tasks = list(records[model][0]["test"])

        rows = [
            summarize_row(model, "mome_rec", runs, self.tasks,
                          *shown_lambdas(model, runs[0]["lambda_neuron"], runs[0]["lambda_expert"]))
            for model, runs in records.items()
        ]
        peer_status, peer_rows, peer_records = self._run_peers()
        rows += peer_rows

        document = {
            "dataset": self.dataset,
            "command": self.command,
            "tasks": self.tasks,
            "seeds": self.seeds,
            "lambda_grid": self.lambda_grid,
            "lambda_search": searches,
            "peers": peer_status,
            "config": self.config.to_dict(),
            "embeddings_mb": _embeddings_mb(records),
            "rows": [row_to_dict(row) for row in rows],
            "runs": {model: [_without_history(record) for record in runs] for model, runs in {**records, **peer_records}.items()},
        }
        figures = self._write_figures(records, rows)
        document["figures"] = [str(path.relative_to(self.out_dir)) for path in figures]
        write_text(self.out_dir / "results.json", json.dumps(document, indent=2, default=float))
        write_text(self.out_dir / "results.csv", csv_table(rows, self.tasks))
        write_text(self.out_dir / "results.md", self.report(rows, document))
        logger.info("wrote %s (results.md, results.csv, results.json, figures/)", self.out_dir)
        return document

    def _run_peers(self) -> Tuple[Dict[str, Any], List[Row], Dict[str, List[Dict[str, Any]]]]:
        if not self.peers:
            return {"status": "not requested"}, [], {}
        version = rechub_version()
        if version is None:
            logger.warning("torch-rechub is not installed, so the table has no peer block; install it with pip install -e '.[bench]'")
            note = "not installed: pip install -e '.[bench]'"
            rows = [Row(f"torch-rechub {PEER_MODELS[name]}", "torch-rechub", note=note) for name in self.peers]
            return {"status": "not installed", "requested": self.peers}, rows, {}
        if version != RECHUB_VERSION:
            logger.warning("torch-rechub %s is installed; the peer block was written for %s", version, RECHUB_VERSION)
        if self.peer_fn is None:
            self.peer_fn = _default_peer_function(self.config)

        rows, records = [], {}
        for name in self.peers:
            runs = [self._train_peer(name, index) for index in range(self.seeds)]
            label = f"torch-rechub {PEER_MODELS[name]}"
            records[label] = runs
            rows.append(summarize_row(label, f"torch-rechub {version}", runs, self.tasks))
        return {"status": "trained", "version": version, "models": self.peers}, rows, records

    # --------------------------------------------------------------- outputs

    def _write_figures(self, records: Dict[str, List[Dict[str, Any]]], rows: Sequence[Row]) -> List[Path]:
        figures_dir = self.out_dir / "figures"
        written: List[Path] = []
        ablation = {
            row.model: row.values["average_auc"]
            for row in rows
            if row.source == "mome_rec" and row.model in ABLATION_VARIANTS and "average_auc" in row.values
        }
        if ablation:
            written.append(ablation_figure(figures_dir / "ablation.png", {self.dataset: ablation},
                                           title=f"MoME ablation on {self.dataset}: {self.seeds} seed(s), mean ± std"))
        points = {
            row.model: (row.values["size_mb"][0], *row.values["average_auc"])
            for row in rows
            if "size_mb" in row.values and "average_auc" in row.values
        }
        if points:
            written.append(auc_size_figure(figures_dir / "auc_size.png", points,
                                           title=f"{self.dataset}: average test AUC against deployed size"))
        for model in ("mome", "mome_w", "mome_n"):
            if model not in records:
                continue
            first = records[model][0]
            lambdas = f"λ1={first['lambda_neuron']:g}, λ2={first['lambda_expert']:g}"
            if first.get("history"):
                written.append(convergence_figure(figures_dir / f"convergence_{model}.png", first["history"],
                                                  title=f"{model} on {self.dataset} ({lambdas}, seed {first['seed']})"))
            if first.get("mask_histogram"):
                written.append(mask_values_figure(figures_dir / f"mask_values_{model}.png", first["mask_histogram"],
                                                  title=f"Expert-mask values of {model} on {self.dataset} ({lambdas})"))
        return written

    def report(self, rows: Sequence[Row], document: Dict[str, Any]) -> str:
        """Return results.md: the table, the settings it was run with, the lambda search and the figures."""
        model = self.config.model
        train = self.config.train
        lines = [
            f"# Comparison on {self.dataset}",
            "",
            f"Command: `{self.command}`" if self.command else "",
            "",
            f"Test metrics, mean ± sample standard deviation over {self.seeds} seed(s); best mean per column in bold. "
            "Size: the network above the embedding tables as deployed, fp32 weights (MoME: the kept base weights, "
            "1 bit per expert-mask entry, and the fp32 value and int32 index of each entry strictly between 0 and 1). "
            "Train s: training time of all epochs, without evaluation.",
            "",
            markdown_table(rows, self.tasks),
            f"- Embedding tables, the same for every mome_rec model: {document['embeddings_mb']:.3f} MB in fp32."
            if document["embeddings_mb"] is not None else "- Embedding tables: unknown.",
            f"- Dimensions: embedding {model.embedding_dim}, bottom or expert MLP {model.hidden_dims}, towers {model.tower_dims}, "
            f"{model.num_experts} experts (CGC and PLE: {_expert_split_text(self.config, len(self.tasks))}), "
            f"dropout {model.dropout}, BatchNorm {model.batch_norm}.",
            f"- Training: {train.epochs} epochs (mome: the first {train.neuron_epochs} learn the neuron masks), batch {train.batch_size}, "
            f"Adam lr {train.lr} on the dense part, {train.embedding_optimizer} lr {train.embedding_lr} on the embedding tables; "
            "the epoch with the best validation average AUC is tested.",
            f"- Peers: {_peer_text(document['peers'])}",
            "",
        ]
        if document["lambda_search"]:
            grid = ", ".join(f"{value:g}" for value in self.lambda_grid)
            lines += [
                f"## L0 weights chosen on the validation split (grid {grid}, seed {train.seed})",
                "",
                "| model | λ1 | λ2 | validation average AUC | test average AUC |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for name, trials in document["lambda_search"].items():
                for trial in trials:
                    shown = shown_lambdas(name, trial["lambda_neuron"], trial["lambda_expert"])
                    lines.append(
                        f"| {name} | {_lambda_text(shown[0])} | {_lambda_text(shown[1])} | "
                        f"{_format_auc(trial['validation_average_auc'])} | {_format_auc(trial['test_average_auc'])} |"
                    )
            lines.append("")
        if document.get("figures"):
            lines += ["## Figures", ""]
            lines += [f"![{Path(path).stem}]({path})" for path in document["figures"]]
            lines.append("")
        return "\n".join(lines)


# ----------------------------------------------------------------- helpers


def trainer_function(env) -> TrainFunction:
    """Return a :data:`TrainFunction` running :class:`mome_rec.trainer.Trainer` in the process group of ``env``."""
    from mome_rec.trainer import Trainer

    def train(config: Config, run_dir: Path) -> Dict[str, Any]:
        return Trainer(config, run_dir, env).run()

    return train


def _default_peer_function(config: Config) -> PeerFunction:
    """Return a :data:`PeerFunction` that reads and preprocesses the split on its first call only."""
    from mome_rec.peers import load_peer_data, train_peer

    loaded = []
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def train(name: str, run_config: Config) -> Dict[str, Any]:
        if not loaded:
            loaded.append(load_peer_data(config))
        return train_peer(name, run_config, loaded[0], device)

    return train


def _checkpoint_mask_histogram(run_dir: Path) -> Optional[Dict[str, Any]]:
    """Return the expert-mask histogram of the run's best checkpoint, or None without one."""
    from mome_rec.errors import InputError
    from mome_rec.restore import load_trained_model

    try:
        trained = load_trained_model(run_dir)
    except InputError as error:
        logger.warning("%s: no mask histogram (%s)", run_dir, error)
        return None
    return expert_mask_histogram(trained.model)


def _score(value: Optional[float]) -> float:
    return float("-inf") if value is None else value


def _format_auc(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _lambda_text(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:g}"


def _embeddings_mb(records: Dict[str, List[Dict[str, Any]]]) -> Optional[float]:
    for runs in records.values():
        for record in runs:
            if record.get("embeddings_mb") is not None:
                return record["embeddings_mb"]
    return None


def _without_history(record: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in record.items() if key != "history"}


def _expert_split_text(config: Config, num_tasks: int) -> str:
    from mome_rec.modules.ple import split_experts

    try:
        shared, per_task = split_experts(config.model, max(num_tasks, 1))
    except ConfigError:
        return "no valid split"
    return f"{shared} shared and {per_task} per task"


def _peer_text(status: Dict[str, Any]) -> str:
    if status["status"] == "trained":
        return (f"torch-rechub {status['version']} {', '.join(PEER_MODELS[name] for name in status['models'])}, "
                "same split, arrays and dimensions; Adam lr as above on every parameter, embeddings included.")
    if status["status"] == "not installed":
        return "torch-rechub is not installed, so there is no peer block (`pip install -e '.[bench]'`)."
    return "not requested (--peers none)."
