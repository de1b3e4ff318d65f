"""Scoring rows/s of the exported MoME, mome_rec's exported MMoE and torch-rechub's MMOE.

Each model scores the same batches of preprocessed synthetic rows (embedding
lookups included) in eval mode without autograd: MoME and MMoE through the
module :func:`mome_rec.inference.load_model` rebuilds from a file written by
:func:`mome_rec.export.export_model`, torch-rechub's MMOE as the module itself.

The models are untrained: speed does not depend on the weights, except
through MoME's pruning. How many neurons the neuron phase prunes depends on
the data, lambda_1 and the training length. MoME is therefore measured at
several kept fractions ``k``: before the phase switch, a fraction ``1 - k``
of each layer's input neurons gets a neuron mask of 0. With ``k = 1`` nothing is pruned
and MoME deploys E experts of MMoE's widths. Expert-mask means are drawn from
``U(-0.5, 1.5)``, so about a quarter of the entries are 0, a quarter 1.
"""

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

from benchmarks.common import Dimensions, median_seconds, ratio, summary, synthetic_parquet, time_interleaved
from benchmarks.over_arch import mome_gemms, reference_run, total_flops
from mome_rec.config import Config
from mome_rec.data.batches import BatchStream
from mome_rec.data.preprocess import Arrays, Preprocessor
from mome_rec.data.synthetic import aliexpress_schema
from mome_rec.model import RankingModel, build_model
from mome_rec.modules.over_arch import OVER_ARCHS

logger = logging.getLogger(__name__)


def build_untrained(dims: Dimensions, over_arch: str, preprocessor: Preprocessor, keep: float = 1.0, seed: int = 0) -> RankingModel:
    """Build a ranking model on the CPU, in eval mode; a MoME is switched to its expert phase, pruned to ``keep``."""
    torch.manual_seed(seed)
    schema = preprocessor.schema
    model = build_model(dims.model_config(over_arch), preprocessor.table_sizes(), len(schema.dense), len(schema.labels),
                        device=torch.device("cpu"))
    arch = model.over_arch
    if over_arch == "mome":
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in arch.layers:
                width = layer.in_features
                pruned = torch.randperm(width, generator=generator)[: width - max(1, round(keep * width))]
                layer.neuron_mask_mu[pruned] = -1.0
        arch.start_expert_phase()
        with torch.no_grad():
            for layer in arch.layers:
                layer.expert_mask_mu.uniform_(-0.5, 1.5, generator=generator)
    return model.eval()


def export(model: RankingModel, preprocessor: Preprocessor, config: Config, path: Path) -> Path:
    """Write ``model`` as a deployable model file at ``path`` and return the path."""
    from mome_rec.export import export_model
    from mome_rec.restore import TrainedModel

    export_model(TrainedModel(model, preprocessor, config, {}), path)
    return path


def scoring_batches(path: Path, preprocessor: Preprocessor, batch_size: int, count: int) -> List[Arrays]:
    """Return the first ``count`` batches of ``path`` as preprocessed arrays, without labels."""
    stream = BatchStream([path], preprocessor, batch_size, split="eval", with_labels=False)
    return list(stream.iter_arrays(max_batches=count))


def loaded_run(loaded_model, batches: Sequence[Arrays]) -> Callable[[], None]:
    tensors = [(torch.from_numpy(arrays.dense), torch.from_numpy(arrays.sparse)) for arrays in batches]

    def run() -> None:
        with torch.inference_mode():
            for dense, sparse in tensors:
                loaded_model.predict(dense, sparse)

    return run


def rechub_run(dims: Dimensions, preprocessor: Preprocessor, batches: Sequence[Arrays]) -> Callable[[], None]:
    from mome_rec.peers import build_peer, feature_dict

    config = Config(model=dims.model_config("mmoe"))
    torch.manual_seed(0)
    model = build_peer("mmoe", config, preprocessor, dims.num_tasks).eval()
    inputs = [feature_dict(arrays, preprocessor, torch.device("cpu")) for arrays in batches]

    def run() -> None:
        with torch.inference_mode():
            for features in inputs:
                model(features)

    return run


def over_arch_run(loaded_model, batches: Sequence[Arrays]) -> Callable[[], None]:
    """Return a function running only the loaded model's over-arch on the batches' features."""
    with torch.inference_mode():
        features = [torch.cat([loaded_model.embeddings(torch.from_numpy(arrays.sparse)), torch.from_numpy(arrays.dense)], dim=1)
                    for arrays in batches]

    def run() -> None:
        with torch.inference_mode():
            for values in features:
                loaded_model.over_arch(values)

    return run


def mome_widths(model: RankingModel) -> List[List[int]]:
    return [[layer.in_features, layer.out_features] for layer in model.over_arch.layers]


def run_scoring(dims: Dimensions, work_dir: Path, keeps: Sequence[float], batches: int, repeats: int) -> Dict[str, Any]:
    """Time every model on the same batches; also the GFLOP/s of each exported over-arch against ``torch.mm``."""
    try:
        from mome_rec.inference import load_model
    except ImportError as error:
        return {"skipped": f"mome_rec.inference is not available ({error})"}

    work_dir = Path(work_dir)
    parquet = synthetic_parquet(work_dir, dims.batch_size * batches)
    preprocessor = Preprocessor.fit([parquet], aliexpress_schema())
    arrays = scoring_batches(parquet, preprocessor, dims.batch_size, batches)
    rows = sum(len(batch) for batch in arrays)

    timers: Dict[str, Callable[[], None]] = {}
    flops: Dict[str, int] = {}
    widths: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    models: Dict[str, RankingModel] = {f"mome_keep_{keep:g}": build_untrained(dims, "mome", preprocessor, keep) for keep in keeps}
    if "mmoe" in OVER_ARCHS:
        models["mmoe"] = build_untrained(dims, "mmoe", preprocessor)
    else:
        skipped["mmoe"] = "over-arch 'mmoe' is not registered"
    for name, model in models.items():
        config = Config(model=dims.model_config("mome" if name.startswith("mome") else "mmoe"))
        loaded = load_model(export(model, preprocessor, config, work_dir / f"{name}.mome"))
        timers[name] = loaded_run(loaded.model, arrays)
        timers[f"over_arch:{name}"] = over_arch_run(loaded.model, arrays)
        layer_widths = mome_widths(model) if name.startswith("mome") else \
            list(zip([dims.in_features] + list(dims.hidden_dims[:-1]), dims.hidden_dims))
        widths[name] = [list(pair) for pair in layer_widths]
        gemms = mome_gemms(layer_widths, dims.num_experts, dims.batch_size, dims.in_features, dims.num_tasks)
        flops[name] = total_flops(gemms, training=False) * len(arrays)
        reference = reference_run(gemms, training=False)
        timers[f"reference:{name}"] = lambda reference=reference: [reference() for _ in arrays]
    try:
        timers["rechub_mmoe"] = rechub_run(dims, preprocessor, arrays)
    except ImportError as error:
        skipped["rechub_mmoe"] = f"torch-rechub is not installed ({error})"

    logger.info("scoring: timing %s on %d rows, %d repeats", ", ".join(timers), rows, repeats)
    seconds = time_interleaved(timers, repeats)
    model_names = [name for name in timers if ":" not in name]
    rates = {name: summary(seconds[name], rows) for name in model_names}
    mmoe = rates.get("mmoe", {}).get("median")
    gflops = {}
    for name in flops:
        achieved = flops[name] / median_seconds(seconds[f"over_arch:{name}"])["median"] / 1e9
        reference = flops[name] / median_seconds(seconds[f"reference:{name}"])["median"] / 1e9
        gflops[name] = {"over_arch": achieved, "torch_mm": reference, "fraction": achieved / reference}
    return {
        "rows_per_second": rates,
        "ratios_vs_mmoe": {name: ratio(rate["median"], mmoe) for name, rate in rates.items()},
        "ratios_of_best_vs_mmoe": {name: ratio(rate["best"], rates.get("mmoe", {}).get("best")) for name, rate in rates.items()},
        "over_arch_gflops": gflops,
        "layer_widths": widths,
        "rows": rows,
        "batch_size": dims.batch_size,
        "skipped": skipped,
    }


def describe(result: Dict[str, Any]) -> List[List[str]]:
    if "skipped" in result and "rows_per_second" not in result:
        return [["scoring", "skipped", result["skipped"]]]
    rows = []
    for name, rate in result["rows_per_second"].items():
        relative = result["ratios_vs_mmoe"].get(name)
        best = result["ratios_of_best_vs_mmoe"].get(name)
        compared = "" if relative is None else f"{relative:.2f}x mmoe (best {best:.2f}x)"
        rows.append([f"score {name}", f"{rate['median']:.0f} rows/s", compared])
    for name, values in result["over_arch_gflops"].items():
        rows.append([f"exported over-arch {name}", f"{values['over_arch']:.1f} GFLOP/s", f"{100 * values['fraction']:.0f} % of torch.mm"])
    return rows
