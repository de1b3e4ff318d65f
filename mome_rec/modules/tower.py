"""The task tower: an MLP that turns a task's representation into one logit."""

from typing import List, Sequence

from torch import Tensor, nn


class Tower(nn.Module):
    """``Linear -> BatchNorm1d -> ReLU -> Dropout`` per hidden width, then ``Linear -> 1``.

    Args:
        in_features: width of the task representation.
        dims: hidden widths; empty means a single linear layer.
        dropout: dropout probability after each hidden layer.
        batch_norm: whether each hidden layer has a BatchNorm1d.

    Shape:
        input ``B x in_features``, output ``B`` (logits).

    Example::

        tower = Tower(256, [128, 64], dropout=0.2, batch_norm=True)
        logits = tower(torch.randn(32, 256))  # shape [32]
    """

    def __init__(self, in_features: int, dims: Sequence[int], dropout: float = 0.2, batch_norm: bool = True) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        width = in_features
        for hidden in dims:
            layers.append(nn.Linear(width, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features).squeeze(-1)
