"""PNG figures of a run and of a comparison: mask values, convergence, ablation, AUC against size.

* mask values: how many expert-mask entries ``clamp(mu, 0, 1)`` sit at 0, at 1
  or in between, over all layers, and the same split per expert.
* convergence: the training objective (binary cross-entropy plus the L0
  penalty) and the mask sparsity per epoch, with the neuron phase shaded.
* ablation: average test AUC of ``base``, ``mome_n``, ``mome_w`` and ``mome``
  per data set, with one standard deviation over seeds as error bars.
* AUC against size: every model of a comparison at its deployed size.

The figures are drawn on :class:`matplotlib.figure.Figure` objects, without
pyplot's global state, and written to a temporary name that is then renamed.

Example::

    paths = write_run_figures(Path("runs/census"), metrics, model=trained.model)
"""

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.figure import Figure

from mome_rec.modules.masks import hard_mask

logger = logging.getLogger(__name__)

MASK_HISTOGRAM_BINS = 10
"""Equal-width bins over the open interval (0, 1) for the expert-mask entries strictly between 0 and 1."""

ABLATION_VARIANTS = ("base", "mome_n", "mome_w", "mome")
"""The MoME ablations, from no masks to both kinds of masks."""

_DPI = 120
_COLORS = {"zero": "#4c72b0", "between": "#dd8452", "one": "#55a868"}


# ----------------------------------------------------------------- statistics


def expert_mask_histogram(model: Any, bins: int = MASK_HISTOGRAM_BINS) -> Optional[Dict[str, Any]]:
    """Count the expert-mask entries ``clamp(mu, 0, 1)`` at 0, at 1 and in ``bins`` bins over (0, 1).

    Args:
        model: a MoME over-arch, or anything with an ``over_arch`` attribute
            (a RankingModel). Its ``layers`` are searched for ``expert_mask_mu``.
        bins: number of equal-width bins for the entries strictly between 0 and 1.

    Returns:
        None when no layer has expert masks. Otherwise a JSON-serialisable dict with
        ``zero`` and ``one``, the counts of entries exactly 0 and 1;
        ``between_edges``, ``bins + 1`` floats from 0 to 1; ``between_counts``,
        ``bins`` counts; ``total``, the number of entries; and ``per_expert``,
        per expert the fractions ``zero``, ``one`` and ``between`` of its entries
        over all layers.
    """
    over_arch = getattr(model, "over_arch", model)
    layers = [layer for layer in getattr(over_arch, "layers", []) if getattr(layer, "expert_mask_mu", None) is not None]
    if not layers:
        return None
    with torch.no_grad():
        masks = torch.cat([hard_mask(layer.expert_mask_mu.detach()).reshape(layer.num_experts, -1) for layer in layers], dim=1)
    values = masks.flatten().cpu().double().numpy()
    between = values[(values > 0) & (values < 1)]
    counts, edges = np.histogram(between, bins=bins, range=(0.0, 1.0))
    per_expert = []
    for expert in masks:
        zero = float((expert == 0).double().mean())
        one = float((expert == 1).double().mean())
        per_expert.append({"zero": zero, "one": one, "between": 1.0 - zero - one})
    return {
        "zero": int((values == 0).sum()),
        "one": int((values == 1).sum()),
        "between_edges": [float(edge) for edge in edges],
        "between_counts": [int(count) for count in counts],
        "total": int(values.size),
        "per_expert": per_expert,
    }


# --------------------------------------------------------------------- figures


def mask_values_figure(path: Path, histogram: Mapping[str, Any], title: str = "Expert-mask values") -> Path:
    """Draw the histogram of :func:`expert_mask_histogram` and the per-expert split; return ``path``.

    Left: the share of all expert-mask entries at exactly 0, in each bin of
    (0, 1) and at exactly 1, on a log scale so that a few in-between entries stay
    visible. Right: per expert, the shares at 0, in between and at 1.
    """
    total = max(int(histogram["total"]), 1)
    edges = histogram["between_edges"]
    labels = ["0"] + [f"{low:.1f}–{high:.1f}" for low, high in zip(edges[:-1], edges[1:])] + ["1"]
    shares = 100.0 * np.array([histogram["zero"], *histogram["between_counts"], histogram["one"]], dtype=float) / total
    colors = [_COLORS["zero"]] + [_COLORS["between"]] * len(histogram["between_counts"]) + [_COLORS["one"]]

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    positions = np.arange(len(labels))
    left.bar(positions, np.where(shares > 0, shares, np.nan), color=colors)
    left.set_yscale("log")
    left.set_ylim(bottom=min(0.5 * _smallest_positive(shares, 100.0), 1.0), top=150)
    left.set_xticks(positions, labels, rotation=45, ha="right")
    left.set_xlabel("mask value clamp(mu, 0, 1)")
    left.set_ylabel("share of all expert-mask entries (%, log scale)")
    left.set_title(f"(a) {histogram['total']:,} entries over all layers and experts")
    for position, share in zip((0, len(labels) - 1), (shares[0], shares[-1])):
        left.annotate(f"{share:.1f}%", (position, max(share, 1e-3)), ha="center", va="bottom", fontsize=9)

    per_expert = histogram["per_expert"]
    experts = np.arange(len(per_expert))
    start = np.zeros(len(per_expert))
    for key, label in (("zero", "at 0"), ("between", "between 0 and 1"), ("one", "at 1")):
        widths = 100.0 * np.array([expert[key] for expert in per_expert])
        right.barh(experts, widths, left=start, color=_COLORS[key], label=label)
        start += widths
    right.set_yticks(experts, [f"expert {index}" for index in experts])
    right.invert_yaxis()
    right.set_xlim(0, 100)
    right.set_xlabel("share of the expert's mask entries (%)")
    right.set_title("(b) per-expert sparsity")
    right.legend(loc="lower right", fontsize=8, framealpha=0.9)

    figure.suptitle(title)
    return _save(figure, path)


def convergence_figure(path: Path, history: Sequence[Mapping[str, Any]], title: str = "Convergence") -> Path:
    """Draw the objective and the mask sparsity per epoch from a trainer's ``history``; return ``path``.

    Each history record needs ``epoch``, ``train_loss`` (the mean training
    objective of the epoch, L0 penalty included), ``l0`` (the penalty at the end
    of the epoch) and ``sparsity`` (the over-arch's ``sparsity()``). The
    optional ``phase`` marks the neuron-phase epochs, which are shaded.
    """
    epochs = np.array([record["epoch"] for record in history], dtype=float)
    objective = np.array([record["train_loss"] for record in history], dtype=float)
    penalty = np.array([record.get("l0", 0.0) or 0.0 for record in history], dtype=float)
    expert_zeros = [_mean_or_nan([e["zero"] for e in (record.get("sparsity") or {}).get("experts") or []]) for record in history]
    neuron_zeros = [_mean_or_nan(list(((record.get("sparsity") or {}).get("neuron") or {}).values())) for record in history]

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    has_penalty = bool(np.any(penalty > 0))
    objective_label = "objective: BCE + L0 (mean per step)" if has_penalty else "objective: BCE (mean per step)"
    left.plot(epochs, objective, marker="o", label=objective_label)
    if has_penalty:
        left.plot(epochs, penalty, marker="s", linestyle="--", label="L0 penalty (end of epoch)")
        left.plot(epochs, np.maximum(objective - penalty, 1e-6), marker="^", linestyle=":", label="objective − L0 ≈ BCE")
        if np.nanmax(objective) / max(np.nanmin(np.maximum(objective - penalty, 1e-6)), 1e-6) > 20:
            left.set_yscale("log")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss (nats per example)")
    left.set_title("(a) training objective")
    left.legend(fontsize=8)

    if not all(math.isnan(value) for value in expert_zeros):
        right.plot(epochs, 100.0 * np.array(expert_zeros), marker="o", label="expert-mask entries at 0")
    if not all(math.isnan(value) for value in neuron_zeros):
        right.plot(epochs, 100.0 * np.array(neuron_zeros), marker="s", label="input neurons with mask 0 (mean over layers)")
    if right.lines:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "this over-arch has no masks", ha="center", va="center", transform=right.transAxes)
    right.set_ylim(-2, 102)
    right.set_xlabel("epoch")
    right.set_ylabel("sparsity (% of mask entries at 0)")
    right.set_title("(b) mask sparsity")

    neuron_epochs = [record["epoch"] for record in history if record.get("phase") == "neuron"]
    if neuron_epochs:
        for axes in (left, right):
            axes.axvspan(min(neuron_epochs) - 0.5, max(neuron_epochs) + 0.5, color="0.9", zorder=0)
        right.annotate("neuron phase", (min(neuron_epochs) - 0.4, 95), fontsize=8, color="0.4")
    for axes in (left, right):
        axes.set_xticks(epochs)
        axes.grid(alpha=0.3)

    figure.suptitle(title)
    return _save(figure, path)


def ablation_figure(
    path: Path, results: Mapping[str, Mapping[str, Tuple[float, float]]], title: str = "MoME ablation"
) -> Path:
    """Draw the average test AUC of each ablation variant per data set; return ``path``.

    Args:
        path: the PNG to write.
        results: data set -> variant (a name of :data:`ABLATION_VARIANTS`) ->
            ``(mean, standard deviation)`` over seeds. Missing variants are left out.
        title: the figure title.
    """
    datasets = list(results)
    variants = [variant for variant in ABLATION_VARIANTS if any(variant in results[name] for name in datasets)]
    figure = Figure(figsize=(max(5.0, 2.2 * len(datasets) + 2.5), 4.2), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / max(len(variants), 1)
    lows: List[float] = []
    highs: List[float] = []
    for index, variant in enumerate(variants):
        positions, means, stds = [], [], []
        for position, dataset in enumerate(datasets):
            if variant in results[dataset]:
                mean, std = results[dataset][variant]
                positions.append(position + (index - (len(variants) - 1) / 2) * width)
                means.append(mean)
                stds.append(std)
        axes.bar(positions, means, width * 0.95, yerr=stds, capsize=3, label=variant)
        for position, mean, std in zip(positions, means, stds):
            axes.annotate(f"{mean:.4f}", (position, mean + std), textcoords="offset points", xytext=(0, 3),
                          ha="center", fontsize=7)
        lows.extend(mean - std for mean, std in zip(means, stds))
        highs.extend(mean + std for mean, std in zip(means, stds))
    if lows:
        # Bars start near the lowest value so that AUC differences of 0.001 stay visible.
        margin = max(max(highs) - min(lows), 0.002)
        axes.set_ylim(min(lows) - 0.5 * margin, max(highs) + 0.6 * margin)
    axes.set_xticks(range(len(datasets)), datasets)
    axes.set_xlabel("data set")
    axes.set_ylabel("average test AUC over tasks")
    axes.legend(title="over-arch", fontsize=8, loc="upper left", ncols=len(variants))
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(title)
    return _save(figure, path)


def auc_size_figure(
    path: Path, points: Mapping[str, Tuple[float, float, float]], title: str = "Average test AUC against deployed size"
) -> Path:
    """Draw each model's average test AUC against its deployed over-arch size; return ``path``.

    Models are told apart by colour and marker in a legend beside the axes,
    because several models share a size: stars for MoME and its ablations,
    squares for torch-rechub peers, circles for the other baselines.

    Args:
        path: the PNG to write.
        points: model name -> ``(size in MB, mean AUC, AUC standard deviation)``.
        title: the figure title.
    """
    figure = Figure(figsize=(9.5, 5.0), layout="constrained")
    axes = figure.subplots()
    palette = matplotlib.colormaps["tab20"]
    for index, (name, (size, mean, std)) in enumerate(points.items()):
        if name in ABLATION_VARIANTS:
            marker, markersize = "*", 12
        elif name.startswith("torch-rechub"):
            marker, markersize = "s", 7
        else:
            marker, markersize = "o", 7
        axes.errorbar([size], [mean], yerr=[std], fmt=marker, markersize=markersize, capsize=3,
                      color=palette(index % 20), label=name)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.tick_params(axis="x", which="minor", labelsize=7)
    axes.set_xlabel("deployed size of the network above the embeddings (MB, log scale)")
    axes.set_ylabel("average test AUC over tasks (mean ± std)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="model")
    axes.set_title(title)
    return _save(figure, path)


# ------------------------------------------------------------------- run level


def write_run_figures(out_dir: Path, metrics: Mapping[str, Any], model: Any = None, *, name: Optional[str] = None) -> List[Path]:
    """Write the figures of one training run to ``out_dir/figures`` and return their paths.

    Args:
        out_dir: the run folder.
        metrics: the trainer's metrics; ``history`` gives ``convergence.png``.
        model: the trained RankingModel or its over-arch; with expert masks it
            gives ``mask_values.png``. A ``mask_histogram`` entry of ``metrics``
            (from :func:`expert_mask_histogram`) is used instead when present.
        name: the run's name in the titles; defaults to the folder name.
    """
    figures_dir = Path(out_dir) / "figures"
    written: List[Path] = []
    name = name or Path(out_dir).resolve().name
    history = metrics.get("history") or []
    if history:
        written.append(convergence_figure(figures_dir / "convergence.png", history, title=f"Convergence of {name}"))
    histogram = metrics.get("mask_histogram")
    if histogram is None and model is not None:
        histogram = expert_mask_histogram(model)
    if histogram is not None:
        written.append(mask_values_figure(figures_dir / "mask_values.png", histogram, title=f"Expert-mask values of {name}"))
    for path in written:
        logger.info("wrote %s", path)
    return written


# --------------------------------------------------------------------- helpers


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp"
    figure.savefig(temporary, format="png", dpi=_DPI)
    os.replace(temporary, path)
    return path


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _smallest_positive(values: np.ndarray, default: float) -> float:
    positive = values[values > 0]
    return float(positive.min()) if positive.size else default
