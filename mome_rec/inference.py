"""The inference module rebuilt from a model file written by :mod:`mome_rec.export`.

:class:`InferenceModel` computes the same logits as the trained
:class:`~mome_rec.model.RankingModel` in eval mode, from plain index tensors
instead of a KeyedJaggedTensor::

    features = [E[sparse + offsets] flattened (B x F*D), dense (B x num_dense)]
    logits   = towers(over_arch(features))                      (B x T)

For a MoME over-arch, loading folds what training kept apart, once:

* the neuron mask ``z`` is already in the stored ``W``, and pruned neurons are absent;
* each expert's weight ``W ⊙ (1 ⊗ z) ⊙ Z_e`` is precomputed, laid out so that
  all experts take one ``addmm`` (first layer, shared input) or one ``baddbmm``
  (later layers) per layer;
* BatchNorm in eval mode is the affine map ``h * s + t`` with
  ``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``,
  folded into the preceding weights (``A s``, ``c s + t``, computed in float64)
  when the file's ``fold_batch_norm`` is true, else applied after the matmul.

The task towers run stacked: one ``baddbmm`` per tower layer for all tasks.
Any other over-arch is rebuilt from the model config and loaded with its state
dict. Its ``Linear -> BatchNorm1d`` pairs inside ``nn.Sequential`` containers
are folded the same way when ``fold_batch_norm`` is true.

The parts are separate modules (``embeddings``, ``over_arch``, ``towers``), so
a benchmark can time each.

Example::

    loaded = load_model("model.mome")
    arrays = loaded.preprocessor.transform(batch, path, first_row, with_labels=False)
    with torch.inference_mode():
        probabilities = loaded.model.predict(torch.from_numpy(arrays.dense), torch.from_numpy(arrays.sparse))
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome_rec.config import ModelConfig
from mome_rec.data.preprocess import Arrays, Preprocessor
from mome_rec.errors import InputError
from mome_rec.export import ExportContents, preprocessor_state, read_model_file, unpack_mask
from mome_rec.modules.over_arch import build_over_arch
from mome_rec.modules.tower import Tower

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ modules


class PooledEmbeddings(nn.Module):
    """Lookups of one id per sparse feature in tables stacked row-wise.

    Args:
        weight: ``sum(num_embeddings) x D``, table ``f``'s rows following table ``f - 1``'s.
        num_embeddings: rows of each table, in feature order.

    Shape:
        input ``B x F`` int64 indices (row ``b``'s id of feature ``f`` indexes table ``f``),
        output ``B x (F * D)``, feature-major as TorchRec's pooled embeddings.
    """

    def __init__(self, weight: Tensor, num_embeddings: Sequence[int]) -> None:
        super().__init__()
        starts = np.concatenate([[0], np.cumsum(num_embeddings)[:-1]]).astype(np.int64)
        self.register_buffer("weight", weight)
        self.register_buffer("offsets", torch.from_numpy(starts))

    def forward(self, sparse: Tensor) -> Tensor:
        return F.embedding(sparse + self.offsets, self.weight).flatten(1)


class AffineReLU(nn.Module):
    """``relu(x A + c)``, optionally followed by BatchNorm's eval-mode scale and shift before the ReLU.

    Args:
        weight: ``in x out`` for a ``B x in`` input, or ``G x in x out`` for a
            ``G x B x in`` input (``G`` experts or tasks).
        bias: ``out`` or ``G x 1 x out``.
        scale, shift: the unfolded BatchNorm ``h * scale + shift``, shaped like ``bias``, or None.
        relu: apply the ReLU (False for a tower's output layer).
    """

    def __init__(
        self, weight: Tensor, bias: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = True
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.relu = relu

    def forward(self, features: Tensor) -> Tensor:
        if self.weight.dim() == 2:
            hidden = torch.addmm(self.bias, features, self.weight)
        else:
            hidden = torch.baddbmm(self.bias, features, self.weight)
        if self.scale is not None:
            hidden = torch.addcmul(self.shift, hidden, self.scale)
        return torch.relu_(hidden) if self.relu else hidden


class FoldedMoME(nn.Module):
    """A MoME over-arch with its masks folded into per-expert weights.

    Args:
        layers: one :class:`AffineReLU` per base-network layer. With experts, the
            first takes ``B x in`` against ``in x (E * out)`` weights, and the others
            take ``E x B x in`` against ``E x in x out``. Without experts all are
            ``in x out``.
        num_experts: E, or 0 for a single network (every expert equal).
        num_tasks: T.
        kept_inputs: indices of the input features the first layer reads, or None for all.
        gate_weight, gate_bias: the gates' ``Linear(F, T * E)``, or None without experts.

    Shape:
        input ``B x F``, output ``T x B x D`` (task-major, as :class:`StackedTowers` takes it).
    """

    def __init__(
        self,
        layers: List[AffineReLU],
        num_experts: int,
        num_tasks: int,
        kept_inputs: Optional[Tensor] = None,
        gate_weight: Optional[Tensor] = None,
        gate_bias: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.register_buffer("kept_inputs", kept_inputs)
        self.register_buffer("gate_weight", gate_weight)
        self.register_buffer("gate_bias", gate_bias)

    def forward(self, features: Tensor) -> Tensor:
        batch = features.shape[0]
        hidden = features if self.kept_inputs is None else features.index_select(1, self.kept_inputs)
        if self.num_experts == 0:
            for layer in self.layers:
                hidden = layer(hidden)
            return hidden.unsqueeze(0).expand(self.num_tasks, -1, -1)

        hidden = self.layers[0](hidden)  # B x (E * out)
        hidden = hidden.view(batch, self.num_experts, -1).transpose(0, 1)  # E x B x out
        for layer in self.layers[1:]:
            hidden = layer(hidden)
        gates = torch.addmm(self.gate_bias, features, self.gate_weight.t())
        gates = torch.softmax(gates.view(batch, self.num_tasks, self.num_experts), dim=-1)
        mixed = torch.bmm(gates, hidden.transpose(0, 1))  # (B x T x E) @ (B x E x D) -> B x T x D
        return mixed.transpose(0, 1)


class StackedOverArch(nn.Module):
    """Any :class:`~mome_rec.modules.over_arch.OverArch`, its T outputs stacked to ``T x B x D``."""

    def __init__(self, over_arch: nn.Module) -> None:
        super().__init__()
        self.over_arch = over_arch

    def forward(self, features: Tensor) -> Tensor:
        return torch.stack(self.over_arch(features), dim=0)


class StackedTowers(nn.Module):
    """T towers of equal shape evaluated together: one ``baddbmm`` per layer for all tasks.

    Shape:
        input ``T x B x D``, output logits ``B x T``.
    """

    def __init__(self, layers: List[AffineReLU]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, representations: Tensor) -> Tensor:
        hidden = representations
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden.squeeze(-1).t()


class InferenceModel(nn.Module):
    """The deployable ranking model: embeddings, over-arch and towers as separate modules.

    Args:
        embeddings: ``B x F`` indices -> ``B x (F * D)``.
        over_arch: ``B x in_features`` -> ``T x B x D``.
        towers: ``T x B x D`` -> ``B x T`` logits.
        num_dense: dense features expected after the pooled embeddings.
    """

    def __init__(self, embeddings: PooledEmbeddings, over_arch: nn.Module, towers: StackedTowers, num_dense: int) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.over_arch = over_arch
        self.towers = towers
        self.num_dense = num_dense

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        """Return the logits ``B x T`` of ``B x num_dense`` float32 dense and ``B x F`` int64 sparse features."""
        features = torch.cat([self.embeddings(sparse), dense], dim=1)
        return self.towers(self.over_arch(features))

    def predict(self, dense: Tensor, sparse: Tensor) -> Tensor:
        """Return the probabilities ``sigmoid(logits)``, ``B x T``."""
        return torch.sigmoid(self.forward(dense, sparse))


# ------------------------------------------------------------------ loading


@dataclasses.dataclass
class LoadedModel:
    """A model file ready to score: the module, the preprocessor for raw columns, the task names."""

    model: InferenceModel
    preprocessor: Preprocessor
    tasks: List[str]
    header: Dict[str, Any]


def load_model(path: Path) -> LoadedModel:
    """Read a model file and rebuild the inference module (eval mode) and the preprocessor.

    A missing, truncated or corrupt file raises InputError with one line.
    """
    contents = read_model_file(path)
    model = build_inference_model(contents)
    try:
        preprocessor = Preprocessor.from_dict(preprocessor_state(contents))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: invalid model file (preprocessor: {error})") from None
    tasks = list(contents.header.get("tasks", []))
    return LoadedModel(model, preprocessor, tasks, contents.header)


def build_inference_model(contents: ExportContents, fold_batch_norm: Optional[bool] = None) -> InferenceModel:
    """Rebuild the :class:`InferenceModel` that ``contents`` describes, in eval mode.

    ``fold_batch_norm`` overrides the file's choice of folding BatchNorm into the weights.
    """
    fold = bool(contents.header.get("fold_batch_norm")) if fold_batch_norm is None else fold_batch_norm
    try:
        with torch.no_grad():
            model = _build(contents, fold)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{contents.path}: invalid model file ({message})") from None
    return model.eval()


def _build(contents: ExportContents, fold: bool) -> InferenceModel:
    header = contents.header
    model_config = ModelConfig(**header["model_config"])
    tables = header["embeddings"]
    embeddings = PooledEmbeddings(contents.tensor("embeddings.weight"), tables["num_embeddings"])

    arch = header["over_arch"]
    if arch["kind"] == "mome":
        over_arch: nn.Module = _build_mome(contents, arch, fold)
    elif arch["kind"] == "module":
        over_arch = _build_module(contents, arch, model_config, fold)
    else:
        raise ValueError(f"unknown over-arch kind {arch['kind']!r}")

    towers = []
    for task in range(int(header["towers"]["count"])):
        tower = Tower(arch["output_dim"], model_config.tower_dims, model_config.dropout, model_config.batch_norm)
        _load_state(tower, contents, f"towers.{task}.")
        towers.append(tower)
    return InferenceModel(embeddings, over_arch, _stack_towers(towers, fold), int(header["num_dense"]))


def _batch_norm_affine(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Return BatchNorm's eval-mode ``(scale, shift)`` in float64."""
    scale = weight.double() / torch.sqrt(var.double() + eps)
    return scale, bias.double() - mean.double() * scale


def _affine_relu(weight: Tensor, bias: Tensor, affine: Optional[Tuple[Tensor, Tensor]], fold: bool, relu: bool = True) -> AffineReLU:
    """Build ``relu(x weight + bias)`` with BatchNorm ``affine`` (shaped like ``bias``) folded or kept apart."""
    if affine is None:
        return AffineReLU(weight.float(), bias.float(), relu=relu)
    scale, shift = affine
    if fold:
        folded_weight = weight.double() * scale  # scale is shaped like bias, so it scales the output columns
        return AffineReLU(folded_weight.float(), (bias.double() * scale + shift).float(), relu=relu)
    return AffineReLU(weight.float(), bias.float(), scale.float(), shift.float(), relu=relu)


def _build_mome(contents: ExportContents, arch: Dict[str, Any], fold: bool) -> FoldedMoME:
    experts = int(arch["num_experts"])
    layer_headers = arch["layers"]
    with_experts = bool(layer_headers[0]["experts"])
    layers = []
    for index, layer in enumerate(layer_headers):
        prefix = f"over_arch.layers.{index}."
        out_features, in_features = int(layer["out_features"]), int(layer["in_features"])
        weight = contents.tensor(prefix + "weight").view(out_features, in_features)
        bias = contents.tensor(prefix + "bias")
        groups = experts if with_experts else 1
        affine = None
        if layer["batch_norm_eps"] is not None:
            vectors = [contents.tensor(prefix + f"batch_norm.{name}").view(groups, out_features)
                       for name in ("weight", "bias", "running_mean", "running_var")]
            affine = _batch_norm_affine(*vectors, float(layer["batch_norm_eps"]))

        if not with_experts:
            scale_shift = None if affine is None else (affine[0][0], affine[1][0])
            layers.append(_affine_relu(weight.t(), bias, scale_shift, fold))
            continue
        masks = unpack_mask(
            contents.tensor(prefix + "expert_masks.bits"),
            contents.tensor(prefix + "expert_masks.fractional_index"),
            contents.tensor(prefix + "expert_masks.fractional_value"),
            [experts, out_features, in_features],
        )
        # The trained layer multiplies (W ⊙ z) by Z_e in fp32; the same product here keeps the weights bit-equal.
        expert_weights = (weight * masks).transpose(1, 2)  # E x in x out
        expert_bias = bias.expand(experts, out_features)
        if index == 0:
            # One addmm against in x (E * out): column e * out + o is expert e's neuron o.
            stacked = expert_weights.permute(1, 0, 2).reshape(in_features, experts * out_features)
            flat_affine = None if affine is None else (affine[0].reshape(-1), affine[1].reshape(-1))
            layers.append(_affine_relu(stacked, expert_bias.reshape(-1), flat_affine, fold))
        else:
            batched_affine = None if affine is None else (affine[0].unsqueeze(1), affine[1].unsqueeze(1))
            layers.append(_affine_relu(expert_weights, expert_bias.unsqueeze(1), batched_affine, fold))

    kept_inputs = contents.tensors.get("over_arch.kept_inputs")
    kept_inputs = kept_inputs.long() if kept_inputs is not None else None
    gate_weight = contents.tensor("over_arch.gates.weight").float() if with_experts else None
    gate_bias = contents.tensor("over_arch.gates.bias").float() if with_experts else None
    return FoldedMoME(layers, experts if with_experts else 0, int(arch["num_tasks"]), kept_inputs, gate_weight, gate_bias)


def _build_module(contents: ExportContents, arch: Dict[str, Any], model_config: ModelConfig, fold: bool) -> StackedOverArch:
    over_arch = build_over_arch(model_config.over_arch, int(arch["in_features"]), int(arch["num_tasks"]), model_config)
    over_arch.load_structure_state(arch["structure"])
    _load_state(over_arch, contents, "over_arch.")
    over_arch.eval()
    if fold:
        fold_sequential_batch_norms(over_arch)
        fold_expert_layers(over_arch)
    return StackedOverArch(over_arch)


def _load_state(module: nn.Module, contents: ExportContents, prefix: str) -> None:
    """Load ``module``'s state from the tensors under ``prefix``; only ``num_batches_tracked`` may be absent."""
    state = {name[len(prefix):]: tensor for name, tensor in contents.tensors.items() if name.startswith(prefix)}
    result = module.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{prefix} tensors do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")


def fold_sequential_batch_norms(module: nn.Module) -> int:
    """Fold every ``Linear`` directly followed by a ``BatchNorm1d`` inside an ``nn.Sequential`` (eval mode).

    The Linear gets ``W s`` and ``b s + t`` (see the module doc) and the
    BatchNorm becomes ``nn.Identity``. Returns the number of pairs folded.
    """
    folded = 0
    for sequential in [child for child in module.modules() if isinstance(child, nn.Sequential)]:
        for index in range(len(sequential) - 1):
            linear, batch_norm = sequential[index], sequential[index + 1]
            if not (isinstance(linear, nn.Linear) and isinstance(batch_norm, nn.BatchNorm1d)):
                continue
            if not batch_norm.track_running_stats or batch_norm.running_mean is None:
                continue
            weight = batch_norm.weight if batch_norm.affine else torch.ones_like(batch_norm.running_mean)
            bias = batch_norm.bias if batch_norm.affine else torch.zeros_like(batch_norm.running_mean)
            scale, shift = _batch_norm_affine(weight, bias, batch_norm.running_mean, batch_norm.running_var, batch_norm.eps)
            linear_bias = linear.bias if linear.bias is not None else torch.zeros_like(batch_norm.running_mean)
            fused = nn.Linear(linear.in_features, linear.out_features)
            fused.weight.data = (linear.weight.double() * scale.unsqueeze(1)).float()
            fused.bias.data = (linear_bias.double() * scale + shift).float()
            sequential[index] = fused
            sequential[index + 1] = nn.Identity()
            folded += 1
    return folded


class FoldedExpertLayer(nn.Module):
    """An :class:`~mome_rec.modules.experts.ExpertLayer` in eval mode, BatchNorm folded, weights laid out once.

    Takes and returns the same shapes as the layer it replaces: ``B x in`` or
    ``B x E x in`` in, ``B x E x out`` out.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        experts, out_features, in_features = layer.weight.shape
        weight = layer.weight.detach().double()
        bias = layer.bias.detach().double()
        if layer.batch_norm is not None:
            norm = layer.batch_norm
            scale, shift = _batch_norm_affine(norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps)
            scale, shift = scale.view(experts, out_features), shift.view(experts, out_features)
            weight = weight * scale.unsqueeze(-1)
            bias = bias * scale + shift
        self.num_experts = experts
        self.out_features = out_features
        # Column e * out + o of the stacked weight is expert e's neuron o, for a shared B x in input.
        self.register_buffer("stacked_weight", weight.permute(2, 0, 1).reshape(in_features, -1).float().contiguous())
        self.register_buffer("stacked_bias", bias.reshape(-1).float())
        self.register_buffer("batched_weight", weight.transpose(1, 2).float().contiguous())  # E x in x out
        self.register_buffer("batched_bias", bias.unsqueeze(1).float())  # E x 1 x out

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() == 2:
            hidden = torch.relu_(torch.addmm(self.stacked_bias, features, self.stacked_weight))
            return hidden.view(features.shape[0], self.num_experts, self.out_features)
        hidden = torch.baddbmm(self.batched_bias, features.transpose(0, 1), self.batched_weight)
        return torch.relu_(hidden).transpose(0, 1)


def fold_expert_layers(module: nn.Module) -> int:
    """Replace every :class:`ExpertLayer` inside ``module`` by a :class:`FoldedExpertLayer`; return how many."""
    from mome_rec.modules.experts import ExpertLayer

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ExpertLayer):
                setattr(parent, name, FoldedExpertLayer(child))
                replaced += 1
    return replaced


def _stack_towers(towers: List[Tower], fold: bool) -> StackedTowers:
    """Turn T equal towers (``Linear [-> BatchNorm1d] -> ReLU -> Dropout`` ..., ``Linear``) into one StackedTowers."""
    per_tower = [_tower_layers(tower) for tower in towers]
    layers = []
    for position in range(len(per_tower[0])):
        weights = torch.stack([layers_of[position][0].weight.t() for layers_of in per_tower])  # T x in x out
        biases = torch.stack([layers_of[position][0].bias for layers_of in per_tower]).unsqueeze(1)  # T x 1 x out
        affine = None
        if per_tower[0][position][1] is not None:
            pairs = []
            for layers_of in per_tower:
                norm = layers_of[position][1]
                pairs.append(_batch_norm_affine(norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps))
            affine = (torch.stack([p[0] for p in pairs]).unsqueeze(1), torch.stack([p[1] for p in pairs]).unsqueeze(1))
        last = position == len(per_tower[0]) - 1
        layers.append(_affine_relu(weights, biases, affine, fold, relu=not last))
    return StackedTowers(layers)


def _tower_layers(tower: Tower) -> List[Tuple[nn.Linear, Optional[nn.BatchNorm1d]]]:
    """Return the tower's ``(Linear, BatchNorm1d or None)`` pairs in the order they run."""
    pairs: List[Tuple[nn.Linear, Optional[nn.BatchNorm1d]]] = []
    for module in tower.modules():
        if isinstance(module, nn.Linear):
            pairs.append((module, None))
        elif isinstance(module, nn.BatchNorm1d):
            pairs[-1] = (pairs[-1][0], module)
    return pairs


# --------------------------------------------------------------- checking


@torch.no_grad()
def compare_with_trained(trained_model: nn.Module, rebuilt: InferenceModel, rows: int = 1024, seed: int = 0) -> float:
    """Return the largest ``|sigmoid(trained) - sigmoid(rebuilt)|`` over ``rows`` random rows.

    Sparse ids are uniform over each table, dense features standard normal (the
    scale of standardised columns). Both models run in eval mode.
    """
    from mome_rec.data.batches import make_batch

    generator = np.random.default_rng(seed)
    sizes = [table.num_embeddings for table in trained_model.tables]
    sparse = np.stack([generator.integers(0, size, rows) for size in sizes], axis=1).astype(np.int64)
    dense = generator.standard_normal((rows, trained_model.num_dense)).astype(np.float32)
    batch = make_batch(Arrays(sparse=sparse.reshape(rows, len(sizes)), dense=dense), [t.feature_names[0] for t in trained_model.tables])

    trained_model.eval()
    expected = torch.sigmoid(trained_model(batch.dense_features, batch.sparse_features))
    actual = rebuilt.predict(torch.from_numpy(dense), torch.from_numpy(sparse.reshape(rows, len(sizes))))
    return float((expected - actual).abs().max())
