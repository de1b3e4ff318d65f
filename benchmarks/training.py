"""Training samples/s of MoME, mome_rec's MMoE and torch-rechub's MMOE on the same batch.

One step is what the dense part of a training step costs: the over-arch and
the towers forward, the loss (the mean of the per-task binary cross-entropies,
plus MoME's L0 penalty), the backward pass and an Adam step. The input
features require a gradient, as the pooled embeddings do in the full model,
so the first layer also computes the gradient of its input.

MoME is timed in both phases. The expert phase is the one with the cost of
MMoE: E experts of the same widths, plus the masks. Its neuron masks are at
their initial mean, so the phase switch prunes nothing and the widths equal
MMoE's. The neuron phase runs one network for every task.

torch-rechub's MMOE reads the same features as one ``DenseFeature`` of width
``in_features``, so it runs no embedding lookups either.
"""

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import Dimensions, median_seconds, ratio, summary, synthetic_batch, time_interleaved
from mome_rec.config import load_config
from mome_rec.model import TaskArch, multitask_loss
from mome_rec.modules import build_over_arch
from mome_rec.modules.over_arch import OVER_ARCHS
from mome_rec.modules.tower import Tower

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[1]
SCHEDULE_CONFIG = REPOSITORY / "configs" / "aliexpress_nl.yaml"
_PAPER_TRAIN = load_config(str(SCHEDULE_CONFIG), check_files=False).train
SCHEDULE = (_PAPER_TRAIN.neuron_epochs, _PAPER_TRAIN.epochs)
"""``(M, epochs)`` of the paper's settings, for the whole-job ratio: M neuron-phase epochs, then the expert phase."""

MOME_EXPERT = "mome_expert_phase"
MOME_NEURON = "mome_neuron_phase"
MMOE = "mmoe"
RECHUB_MMOE = "rechub_mmoe"


def task_arch(dims: Dimensions, over_arch_name: str, expert_phase: bool = False) -> TaskArch:
    """Build the over-arch ``over_arch_name`` and one tower per task, in training mode."""
    config = dims.model_config(over_arch_name)
    over_arch = build_over_arch(over_arch_name, dims.in_features, dims.num_tasks, config)
    if expert_phase:
        over_arch.start_expert_phase()
    towers = nn.ModuleList(Tower(over_arch.output_dim, config.tower_dims, config.dropout, config.batch_norm)
                           for _ in range(dims.num_tasks))
    return TaskArch(over_arch, towers).train()


def rechub_mmoe(dims: Dimensions) -> nn.Module:
    """Build torch-rechub's MMOE reading one dense feature of width ``in_features``."""
    from torch_rechub.basic.features import DenseFeature
    from torch_rechub.models.multi_task import MMOE

    config = dims.model_config("mmoe")
    mlp = {"dims": list(config.hidden_dims), "dropout": config.dropout}
    towers = [{"dims": list(config.tower_dims), "dropout": config.dropout} for _ in range(dims.num_tasks)]
    model = MMOE([DenseFeature("features", embed_dim=dims.in_features)], ["classification"] * dims.num_tasks,
                 n_expert=config.num_experts, expert_params=mlp, tower_params_list=towers)
    return model.train()


def training_step(model: nn.Module, features: Tensor, labels: Tensor, steps: int, rechub: bool = False) -> Callable[[], None]:
    """Return a function that runs ``steps`` Adam steps of ``model`` on one batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            features.grad = None
            if rechub:
                loss = F.binary_cross_entropy(model({"features": features}), labels)
            else:
                loss = multitask_loss(model(features), labels) + model.over_arch.regularization()
            loss.backward()
            optimizer.step()

    return run


def mome_components(model: TaskArch, features: Tensor) -> Dict[str, Callable[[], None]]:
    """Return timers of the MoME-only work of one expert-phase step, summed over the layers.

    ``noise``: the ``normal_`` draws of the expert-mask noise. ``masks``:
    building the expert weights and their backward pass, the noise included.
    ``l0``: the L0 penalty and its gradient.
    """
    over_arch = model.over_arch
    layers = list(over_arch.layers)
    gradients = [torch.ones(layer.expert_mask_mu.shape) for layer in layers]

    def noise() -> None:
        for layer in layers:
            torch.empty_like(layer.expert_mask_mu).normal_(0.0, layer.sigma)

    def masks() -> None:
        for layer, gradient in zip(layers, gradients):
            layer.masked_weight().backward(gradient)

    def l0() -> None:
        over_arch.regularization().backward()

    return {"noise": noise, "masks": masks, "l0": l0}


def schedule_rate(neuron_rate: Optional[float], expert_rate: Optional[float], neuron_epochs: int, epochs: int) -> Optional[float]:
    """Return the mean samples/s of a whole MoME training job: ``neuron_epochs`` at ``neuron_rate``, the rest at ``expert_rate``.

    Every epoch has the same rows, so the mean rate is ``epochs / (M / neuron_rate + (epochs - M) / expert_rate)``.
    """
    if not neuron_rate or not expert_rate:
        return None
    return epochs / (neuron_epochs / neuron_rate + (epochs - neuron_epochs) / expert_rate)


def run_training(dims: Dimensions, repeats: int, steps: int) -> Dict[str, Any]:
    """Time every candidate's training step and MoME's own parts; return rates, ratios and shares."""
    features, labels = synthetic_batch(dims)
    features.requires_grad_(True)

    candidates: Dict[str, Callable[[], None]] = {}
    skipped: Dict[str, str] = {}
    torch.manual_seed(0)
    mome = task_arch(dims, "mome", expert_phase=True)
    candidates[MOME_EXPERT] = training_step(mome, features, labels, steps)
    candidates[MOME_NEURON] = training_step(task_arch(dims, "mome"), features, labels, steps)
    if "mmoe" in OVER_ARCHS:
        candidates[MMOE] = training_step(task_arch(dims, "mmoe"), features, labels, steps)
    else:
        skipped[MMOE] = "over-arch 'mmoe' is not registered"
    try:
        candidates[RECHUB_MMOE] = training_step(rechub_mmoe(dims), features, labels, steps, rechub=True)
    except ImportError as error:
        skipped[RECHUB_MMOE] = f"torch-rechub is not installed ({error})"
    components = mome_components(mome, features)
    timers = dict(candidates)
    timers.update({f"component:{name}": run for name, run in components.items()})

    logger.info("training: timing %s, %d repeats of %d steps", ", ".join(candidates), repeats, steps)
    seconds = time_interleaved(timers, repeats)

    rates = {name: summary([value / steps for value in seconds[name]], dims.batch_size) for name in candidates}
    step_seconds = {name: median_seconds([value / steps for value in seconds[name]]) for name in candidates}
    expert_step = step_seconds[MOME_EXPERT]["median"]
    shares = {name: median_seconds(seconds[f"component:{name}"])["median"] / expert_step for name in components}

    def ratios_of(statistic: str) -> Dict[str, Optional[float]]:
        def rate(name: str) -> Optional[float]:
            return rates[name][statistic] if name in rates else None

        return {
            "mome_expert_phase_vs_mmoe": ratio(rate(MOME_EXPERT), rate(MMOE)),
            "mome_neuron_phase_vs_mmoe": ratio(rate(MOME_NEURON), rate(MMOE)),
            "rechub_mmoe_vs_mmoe": ratio(rate(RECHUB_MMOE), rate(MMOE)),
            "mome_expert_phase_vs_rechub_mmoe": ratio(rate(MOME_EXPERT), rate(RECHUB_MMOE)),
            "mome_schedule_vs_mmoe": ratio(schedule_rate(rate(MOME_NEURON), rate(MOME_EXPERT), *SCHEDULE), rate(MMOE)),
        }

    return {
        "samples_per_second": rates,
        "schedule": {"neuron_epochs": SCHEDULE[0], "epochs": SCHEDULE[1], "from": str(SCHEDULE_CONFIG.relative_to(REPOSITORY))},
        "step_seconds": step_seconds,
        "ratios": ratios_of("median"),
        "ratios_of_best": ratios_of("best"),
        "mome_expert_step_shares": shares,
        "steps_per_repeat": steps,
        "skipped": skipped,
    }


def describe(result: Dict[str, Any]) -> List[List[str]]:
    """Return table rows: candidate, samples/s and ratio to mome_rec's MMoE."""
    rows = []
    mmoe = result["samples_per_second"].get(MMOE, {}).get("median")
    for name, rate in result["samples_per_second"].items():
        relative = ratio(rate["median"], mmoe)
        best = ratio(rate["best"], result["samples_per_second"].get(MMOE, {}).get("best"))
        compared = "" if relative is None else f"{relative:.2f}x mmoe (best {best:.2f}x)"
        rows.append([f"train {name}", f"{rate['median']:.0f} samples/s", compared])
    for name, share in result["mome_expert_step_shares"].items():
        rows.append([f"train mome expert step: {name}", f"{100 * share:.1f} % of the step", ""])
    return rows
