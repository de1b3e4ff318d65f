"""Model sizes: the deployed network, the same network unpruned, and the embedding tables.

All sizes count bytes; :func:`size_report` converts them to MB with 1 MB = 1e6 bytes.
"""

import math
from typing import TYPE_CHECKING, Dict, Optional, Sequence

from torch import Tensor, nn

if TYPE_CHECKING:
    from mome_rec.model import RankingModel

FP32_BYTES = 4
INT32_BYTES = 4
BYTES_PER_MB = 1e6


def mlp_fp32_bytes(
    in_features: int, hidden_dims: Sequence[int], *, batch_norm: bool, output_dim: Optional[int] = None
) -> int:
    """Return the fp32 bytes of an MLP: parameters plus BatchNorm running statistics.

    Each hidden layer of width ``h`` over an input of width ``w`` has ``w * h``
    weights and ``h`` biases, plus ``4 * h`` values with ``batch_norm`` (scale,
    shift, running mean, running variance). An ``output_dim`` adds a final
    ``Linear`` without BatchNorm. BatchNorm's int64 ``num_batches_tracked``
    counter is left out.

    Example::

        mlp_fp32_bytes(256, [128, 64], batch_norm=True, output_dim=1)  # a tower: 41985 * 4 bytes
    """
    values = 0
    width = in_features
    for hidden in hidden_dims:
        values += width * hidden + hidden
        if batch_norm:
            values += 4 * hidden
        width = hidden
    if output_dim is not None:
        values += width * output_dim + output_dim
    return values * FP32_BYTES


def module_fp32_bytes(module: nn.Module) -> int:
    """Return the bytes of every floating-point parameter and buffer of ``module`` stored in fp32.

    Integer buffers (BatchNorm's ``num_batches_tracked``, index buffers) are left out.
    """
    tensors = {id(tensor): tensor for tensor in list(module.parameters()) + list(module.buffers())}
    return sum(tensor.numel() for tensor in tensors.values() if tensor.is_floating_point()) * FP32_BYTES


def packed_mask_bytes(mask: Tensor) -> int:
    """Return the bytes of a hard mask stored at 1 bit per entry plus its fractional entries.

    A 1-bit mask holds only 0 and 1, so each entry strictly between 0 and 1 also
    stores its fp32 value and an int32 flat index.
    """
    fractional = int(((mask > 0) & (mask < 1)).sum())
    return math.ceil(mask.numel() / 8) + fractional * (FP32_BYTES + INT32_BYTES)


def size_report(model: "RankingModel", embeddings_mb: Optional[float] = None) -> Dict[str, float]:
    """Return ``deployable``, ``dense_fp32`` and ``embeddings`` sizes of a ranking model in MB.

    ``deployable`` is the over-arch as deployed (see ``OverArch.deployable_bytes``)
    plus the towers in fp32. ``dense_fp32`` is the over-arch before pruning, masks
    included, in fp32, plus the towers. ``embeddings`` counts every table in fp32
    from the table configs. Pass ``embeddings_mb`` to reuse a value computed
    earlier.
    """
    towers = module_fp32_bytes(model.towers)
    if embeddings_mb is None:
        table_values = sum(table.num_embeddings * table.embedding_dim for table in model.tables)
        embeddings_mb = table_values * FP32_BYTES / BYTES_PER_MB
    return {
        "deployable": (model.over_arch.deployable_bytes() + towers) / BYTES_PER_MB,
        "dense_fp32": (model.over_arch.dense_fp32_bytes() + towers) / BYTES_PER_MB,
        "embeddings": float(embeddings_mb),
    }
