"""The deployable model file: a JSON header and raw little-endian tensors, with no pickled code.

Layout of a ``.mome`` file::

    magic      8 bytes  b"MOMEREC1"
    length     8 bytes  uint64 little-endian, the bytes of the header that follows
    header     JSON (UTF-8), padded with spaces to a multiple of 8 bytes
    payload    the tensors back to back; header["tensors"][name] gives dtype, shape and offset

The header also carries the payload's length and CRC-32, so a truncated or
corrupt file is rejected on reading with one :class:`~mome_rec.errors.InputError`
line.

What :func:`export_model` stores:

* ``embeddings.weight``: every embedding table stacked row-wise in schema order (fp32).
* For a MoME over-arch (``base``, ``mome_n``, ``mome_w`` and ``mome``), per layer ``i``
  under ``over_arch.layers.i``: ``weight`` ``W ⊙ (1 ⊗ z)`` with the neurons whose
  neuron mask ``z`` is 0 removed, ``bias``, the BatchNorm's four vectors, and the
  expert masks ``Z_e`` packed at 1 bit per entry (``expert_masks.bits``: bit 1
  where the mask is non-zero) plus, for each entry strictly between 0 and 1, its
  int32 flat index (``expert_masks.fractional_index``) and fp32 value
  (``expert_masks.fractional_value``). ``over_arch.kept_inputs`` (int32) lists the
  input features the first layer keeps when it keeps fewer than all. The gates
  are stored when the layers have expert masks.
* For any other over-arch: its state dict, BatchNorm's ``num_batches_tracked`` left out.
* ``towers.T.*``: each task tower's state dict, ``num_batches_tracked`` left out.
* ``vocabularies.COLUMN``: integer vocabularies in the smallest integer type that holds them.
  String vocabularies, the schema and the dense statistics live in the header.

Every tensor except the vocabularies counts towards the model size, and that
sum equals ``size_report``'s ``deployable + embeddings`` (:mod:`mome_rec.sizes`).

Example::

    trained = load_trained_model("runs/synthetic")
    summary = export_model(trained, "model.mome")
    contents = read_export("model.mome")  # ExportContents(header, tensors)
"""

import dataclasses
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from mome_rec.errors import InputError
from mome_rec.modules.masks import hard_mask
from mome_rec.modules.mome import MoMEOverArch

if TYPE_CHECKING:
    from mome_rec.restore import TrainedModel

logger = logging.getLogger(__name__)

MAGIC = b"MOMEREC1"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sQ")
_ALIGNMENT = 8

_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

VOCABULARY_PREFIX = "vocabularies."

PROBABILITY_TOLERANCE = 1e-6
"""Largest probability difference to the trained model at which BatchNorm stays folded."""
MISMATCH_LIMIT = 1e-3
"""A probability difference this large means the rebuilt module computes another function: export fails."""


@dataclasses.dataclass
class ExportContents:
    """A model file read back: its JSON header and its tensors by name (CPU, sharing one buffer)."""

    header: Dict[str, Any]
    tensors: Dict[str, Tensor]
    path: Path

    def tensor(self, name: str) -> Tensor:
        """Return tensor ``name``; a missing name raises InputError naming the file."""
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.path}: invalid model file (tensor {name} missing)") from None


@dataclasses.dataclass
class ExportSummary:
    """Byte counts of a written model file.

    Attributes:
        path: the file.
        file_bytes: its size.
        header_bytes: magic, length and JSON header (schema, statistics, string vocabularies).
        model_bytes: the model's tensors, the quantity that ``size_mb.deployable + size_mb.embeddings`` predicts.
        vocabulary_bytes: the integer vocabularies.
        fold_batch_norm: whether the loader folds BatchNorm into the weights.
        max_abs_difference: largest difference of predicted probabilities between the
            trained model and the module rebuilt from the file, on a random probe batch.
    """

    path: Path
    file_bytes: int
    header_bytes: int
    model_bytes: int
    vocabulary_bytes: int
    fold_batch_norm: bool
    max_abs_difference: float


# ------------------------------------------------------------------ format


def write_model_file(path: Path, header: Dict[str, Any], tensors: Dict[str, Tensor]) -> int:
    """Write ``header`` and ``tensors`` to ``path`` atomically and return the file size in bytes.

    Tensors are laid out widest dtype first, so every offset is aligned to its
    element size without padding. ``header`` gains ``tensors``,
    ``payload_bytes`` and ``payload_crc32``.
    """
    path = Path(path)
    arrays: List[Tuple[str, np.ndarray, torch.dtype]] = []
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"write_model_file: tensor {name} has unsupported dtype {tensor.dtype}")
        flat = tensor.detach().cpu().contiguous()
        # numpy has no bfloat16, so every tensor is written through its raw bytes.
        raw = flat.reshape(-1).view(torch.uint8) if flat.numel() else torch.zeros(0, dtype=torch.uint8)
        arrays.append((name, raw.numpy(), tensor.dtype))
    arrays.sort(key=lambda item: -item[2].itemsize)

    entries: Dict[str, Dict[str, Any]] = {}
    offset = 0
    for name, raw, dtype in arrays:
        offset = -(-offset // dtype.itemsize) * dtype.itemsize
        entries[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(tensors[name].shape), "offset": offset}
        offset += raw.nbytes
    payload_bytes = offset

    crc = 0
    position = 0
    for name, raw, _ in arrays:
        gap = entries[name]["offset"] - position
        crc = zlib.crc32(raw, zlib.crc32(bytes(gap), crc))
        position = entries[name]["offset"] + raw.nbytes

    full_header = dict(header, tensors=entries, payload_bytes=payload_bytes, payload_crc32=crc)
    encoded = json.dumps(full_header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % _ALIGNMENT)

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as stream:
            stream.write(_PREFIX.pack(MAGIC, len(encoded)))
            stream.write(encoded)
            position = 0
            for name, raw, _ in arrays:
                stream.write(bytes(entries[name]["offset"] - position))
                stream.write(memoryview(raw))
                position = entries[name]["offset"] + raw.nbytes
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path.stat().st_size


def read_model_file(path: Path) -> ExportContents:
    """Read a model file, checking its magic, lengths and checksum.

    Any problem (missing, truncated, corrupt, another format) raises
    :class:`InputError` with one line that names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    with open(path, "rb") as stream:
        data = bytearray(stream.read())

    def invalid(reason: str) -> InputError:
        return InputError(f"{path}: invalid model file ({reason}); export it again with 'mome-rec export'")

    if len(data) < _PREFIX.size:
        raise invalid(f"truncated: {len(data)} bytes")
    magic, header_bytes = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise invalid("not a mome_rec model file: wrong magic bytes")
    payload_start = _PREFIX.size + header_bytes
    if payload_start > len(data):
        raise invalid(f"truncated: the header needs {header_bytes} bytes, {len(data) - _PREFIX.size} follow")
    try:
        header = json.loads(bytes(data[_PREFIX.size : payload_start]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(f"corrupt header: {error}") from None
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        version = header.get("format_version") if isinstance(header, dict) else None
        raise invalid(f"format version {version!r}, this mome_rec reads version {FORMAT_VERSION}")

    try:
        payload_bytes = int(header["payload_bytes"])
        expected_crc = int(header["payload_crc32"])
        entries = header["tensors"]
    except (KeyError, TypeError, ValueError) as error:
        raise invalid(f"header field {error} missing or invalid") from None
    found = len(data) - payload_start
    if found != payload_bytes:
        kind = "truncated" if found < payload_bytes else "trailing bytes"
        raise invalid(f"{kind}: the payload should be {payload_bytes} bytes, found {found}")
    payload = memoryview(data)[payload_start:]
    if zlib.crc32(payload) != expected_crc:
        raise invalid("corrupt: the payload checksum does not match")

    tensors: Dict[str, Tensor] = {}
    for name, entry in entries.items():
        tensors[name] = _tensor_view(data, payload_start, payload_bytes, name, entry, invalid)
    return ExportContents(header, tensors, path)


def _tensor_view(data: bytearray, start: int, payload_bytes: int, name: str, entry: Any, invalid) -> Tensor:
    """Return the tensor ``entry`` describes as a view of ``data`` (no copy)."""
    try:
        dtype = _DTYPES[entry["dtype"]]
        shape = [int(size) for size in entry["shape"]]
        offset = int(entry["offset"])
    except (KeyError, TypeError, ValueError):
        raise invalid(f"tensor {name}: invalid entry {entry!r}") from None
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = count * dtype.itemsize
    if min(shape, default=0) < 0 or offset < 0 or offset + nbytes > payload_bytes:
        raise invalid(f"tensor {name}: shape {shape} at offset {offset} lies outside the payload")
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=count, offset=start + offset).view(shape)


# ------------------------------------------------------------------ export


def export_model(trained: "TrainedModel", path: Path, probe_rows: int = 1024) -> ExportSummary:
    """Write the deployable form of a trained model to ``path`` and check it.

    After writing, the file is read back, rebuilt with
    :func:`mome_rec.inference.build_inference_model` and compared with the
    trained model on ``probe_rows`` random rows (valid ids, standard-normal dense
    features). BatchNorm is folded into the weights unless that moves a
    predicted probability by 1e-6 or more; then the file is rewritten with
    ``fold_batch_norm: false``, so the loader applies BatchNorm as a separate
    scale and shift.
    """
    from mome_rec.inference import build_inference_model, compare_with_trained

    model = trained.model
    preprocessor = trained.preprocessor
    model.eval()
    tensors: Dict[str, Tensor] = {"embeddings.weight": _stacked_tables(model)}
    over_arch = model.over_arch
    if isinstance(over_arch, MoMEOverArch):
        over_arch_header = _mome_tensors(over_arch, tensors)
    else:
        over_arch_header = _module_tensors(over_arch, "over_arch.", tensors)
    for task, tower in enumerate(model.towers):
        _state_tensors(tower, f"towers.{task}.", tensors)
    model_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    preprocessor_header, vocabulary_tensors = _preprocessor_entries(preprocessor.to_dict())
    tensors.update(vocabulary_tensors)
    vocabulary_bytes = sum(tensor.numel() * tensor.element_size() for tensor in vocabulary_tensors.values())

    header: Dict[str, Any] = {
        "format": "mome_rec model",
        "format_version": FORMAT_VERSION,
        "tasks": list(preprocessor.schema.labels),
        "model_config": dataclasses.asdict(trained.config.model),
        "num_dense": model.num_dense,
        "embeddings": {
            "columns": [table.feature_names[0] for table in model.tables],
            "num_embeddings": [table.num_embeddings for table in model.tables],
            "dim": model.tables[0].embedding_dim if model.tables else 0,
        },
        "over_arch": over_arch_header,
        "towers": {"count": len(model.towers)},
        "fold_batch_norm": True,
        "preprocessor": preprocessor_header,
        "model_bytes": model_bytes,
        "vocabulary_bytes": vocabulary_bytes,
    }

    difference = None
    for fold in (True, False):
        header["fold_batch_norm"] = fold
        file_bytes = write_model_file(path, header, tensors)
        rebuilt = build_inference_model(read_model_file(path))
        difference = compare_with_trained(model, rebuilt, probe_rows)
        if difference < PROBABILITY_TOLERANCE:
            break
        if fold:
            logger.info("folding BatchNorm moves a probability by %.2e; storing it unfolded", difference)
    if difference >= MISMATCH_LIMIT:
        Path(path).unlink()
        raise RuntimeError(
            f"export: the module rebuilt from {path} differs from the trained model by {difference:.2e} in "
            "probability, so the file does not describe this model; the file was removed"
        )
    if difference >= PROBABILITY_TOLERANCE:
        logger.warning("the exported model differs from the trained one by %.2e in probability", difference)

    header_bytes = file_bytes - sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    return ExportSummary(
        Path(path), file_bytes, header_bytes, model_bytes, vocabulary_bytes, header["fold_batch_norm"], difference
    )


def _stacked_tables(model: nn.Module) -> Tensor:
    """Return the embedding tables stacked row-wise in table order: ``sum(num_embeddings) x D``."""
    tables = model.sparse_arch.embedding_bags
    weights = [tables[table.name].weight.detach().float() for table in model.tables]
    dims = {weight.shape[1] for weight in weights}
    if len(dims) > 1:
        raise ValueError(f"export: the embedding tables have different widths {sorted(dims)}")
    return torch.cat(weights, dim=0) if weights else torch.zeros(0, 0)


def _state_tensors(module: nn.Module, prefix: str, tensors: Dict[str, Tensor]) -> None:
    """Add ``module``'s state dict under ``prefix``, without BatchNorm's ``num_batches_tracked``."""
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        tensors[prefix + key] = value.detach().clone()


def _module_tensors(over_arch: nn.Module, prefix: str, tensors: Dict[str, Tensor]) -> Dict[str, Any]:
    """Store any over-arch by its state dict; the loader rebuilds it from the model config."""
    _state_tensors(over_arch, prefix, tensors)
    return {
        "kind": "module",
        "in_features": over_arch.in_features,
        "num_tasks": over_arch.num_tasks,
        "output_dim": over_arch.output_dim,
        "structure": over_arch.structure_state(),
    }


@torch.no_grad()
def _mome_tensors(over_arch: MoMEOverArch, tensors: Dict[str, Tensor]) -> Dict[str, Any]:
    """Store a MoME over-arch pruned and with packed masks (see the module doc); return its header entry."""
    layers = over_arch.layers
    neuron_masks = [_hard_neuron_mask(layer) for layer in layers]
    keeps = [
        torch.ones(layer.in_features, dtype=torch.bool) if mask is None else mask > 0
        for layer, mask in zip(layers, neuron_masks)
    ]
    layer_headers = []
    for index, layer in enumerate(layers):
        prefix = f"over_arch.layers.{index}."
        in_keep = keeps[index]
        out_keep = keeps[index + 1] if index + 1 < len(layers) else torch.ones(layer.out_features, dtype=torch.bool)
        weight = layer.weight.detach()
        if neuron_masks[index] is not None:
            weight = weight * neuron_masks[index]
        tensors[prefix + "weight"] = weight[out_keep][:, in_keep].contiguous()
        tensors[prefix + "bias"] = layer.bias.detach()[out_keep].clone()

        experts = layer.num_experts if layer.has_experts else 1
        batch_norm = layer.batch_norm
        if batch_norm is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                values = getattr(batch_norm, name).detach().view(experts, layer.out_features)
                tensors[prefix + f"batch_norm.{name}"] = values[:, out_keep].reshape(-1).clone()
        if layer.has_experts:
            masks = hard_mask(layer.expert_mask_mu.detach())[:, out_keep][:, :, in_keep]
            bits, fractional_index, fractional_value = pack_mask(masks)
            tensors[prefix + "expert_masks.bits"] = bits
            tensors[prefix + "expert_masks.fractional_index"] = fractional_index
            tensors[prefix + "expert_masks.fractional_value"] = fractional_value
        layer_headers.append(
            {
                "in_features": int(in_keep.sum()),
                "out_features": int(out_keep.sum()),
                "experts": layer.has_experts,
                "batch_norm_eps": batch_norm.eps if batch_norm is not None else None,
            }
        )

    inputs = over_arch.kept_inputs if over_arch.kept_inputs is not None else torch.arange(layers[0].in_features)
    kept_inputs = inputs[keeps[0]]
    if kept_inputs.numel() < over_arch.in_features:
        tensors["over_arch.kept_inputs"] = kept_inputs.to(torch.int32)
    has_gates = layers[0].has_experts
    if has_gates:
        tensors["over_arch.gates.weight"] = over_arch.gates.linear.weight.detach().clone()
        tensors["over_arch.gates.bias"] = over_arch.gates.linear.bias.detach().clone()
    return {
        "kind": "mome",
        "in_features": over_arch.in_features,
        "num_tasks": over_arch.num_tasks,
        "output_dim": over_arch.output_dim,
        "num_experts": over_arch.num_experts,
        "layers": layer_headers,
        "gates": has_gates,
    }


def _hard_neuron_mask(layer) -> Optional[Tensor]:
    """Return the layer's neuron mask ``clamp(mu, 0, 1)`` (frozen or still learned), or None."""
    if layer.neuron_mask is not None:
        return layer.neuron_mask.detach()
    if layer.neuron_mask_mu is not None:
        return hard_mask(layer.neuron_mask_mu.detach())
    return None


def pack_mask(mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Pack a hard mask (values in [0, 1]) into bits and its fractional entries.

    Returns:
        ``bits``: uint8, ``ceil(numel / 8)`` bytes; bit ``k`` (little-endian
        within each byte) of the flattened mask is 1 where the entry is non-zero.
        ``fractional_index``: int32 flat indices of the entries strictly between 0 and 1.
        ``fractional_value``: their fp32 values.
    """
    flat = mask.detach().reshape(-1).float().cpu().numpy()
    if flat.size >= 2**31:
        raise ValueError(f"pack_mask: {flat.size} entries do not fit int32 indices")
    bits = np.packbits(flat > 0, bitorder="little")
    fractional = np.flatnonzero((flat > 0) & (flat < 1))
    return (
        torch.from_numpy(bits),
        torch.from_numpy(fractional.astype(np.int32)),
        torch.from_numpy(flat[fractional].astype(np.float32)),
    )


def unpack_mask(bits: Tensor, fractional_index: Tensor, fractional_value: Tensor, shape: List[int]) -> Tensor:
    """Invert :func:`pack_mask`: return the fp32 mask of ``shape``."""
    count = int(np.prod(shape, dtype=np.int64))
    if bits.numel() != -(-count // 8) or fractional_index.numel() != fractional_value.numel():
        raise ValueError(f"unpack_mask: {bits.numel()} bytes and {fractional_index.numel()} fractional entries "
                         f"do not describe a mask of shape {shape}")
    flat = np.unpackbits(bits.numpy(), count=count, bitorder="little").astype(np.float32)
    index = fractional_index.numpy().astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= count):
        raise ValueError(f"unpack_mask: a fractional index lies outside a mask of {count} entries")
    flat[index] = fractional_value.numpy()
    return torch.from_numpy(flat).view(shape)


def _preprocessor_entries(state: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """Move integer vocabularies out of the preprocessor state into tensors of the smallest integer type."""
    header = dict(state)
    vocabularies: Dict[str, Any] = {}
    tensors: Dict[str, Tensor] = {}
    string_ids = state["schema"].get("sparse_kind") == "string"
    for column, values in state["vocabularies"].items():
        if string_ids:
            vocabularies[column] = list(values)
            continue
        array = np.asarray(values, dtype=np.int64)
        name = VOCABULARY_PREFIX + column
        tensors[name] = torch.from_numpy(array.astype(_smallest_int_type(array)))
        vocabularies[column] = {"tensor": name}
    header["vocabularies"] = vocabularies
    return header, tensors


def _smallest_int_type(array: np.ndarray) -> type:
    """Return the narrowest of uint8, int16, int32 and int64 that can store every value of ``array``."""
    low = int(array.min()) if array.size else 0
    high = int(array.max()) if array.size else 0
    for kind in (np.uint8, np.int16, np.int32):
        info = np.iinfo(kind)
        if info.min <= low and high <= info.max:
            return kind
    return np.int64


def preprocessor_state(contents: ExportContents) -> Dict[str, Any]:
    """Return the :meth:`Preprocessor.to_dict` state stored in a model file."""
    state = dict(contents.header["preprocessor"])
    vocabularies = {}
    for column, entry in state["vocabularies"].items():
        if isinstance(entry, dict):
            vocabularies[column] = contents.tensor(entry["tensor"]).numpy().astype(np.int64)
        else:
            vocabularies[column] = entry
    state["vocabularies"] = vocabularies
    return state
