"""Neural-network modules: masks, the MoME layer and over-arch, the baseline over-arches, gates and towers.

Importing this package registers every over-arch known to
:func:`~mome_rec.modules.over_arch.build_over_arch`; a new over-arch module is
imported here for the same reason.
"""

from mome_rec.modules import aitm  # noqa: F401  (registers aitm)
from mome_rec.modules import baselines  # noqa: F401  (registers single_task, shared_bottom, moe, mmoe)
from mome_rec.modules import mome  # noqa: F401  (registers mome, base, mome_n, mome_w)
from mome_rec.modules import ple  # noqa: F401  (registers cgc, ple)
from mome_rec.modules.aitm import AITMOverArch, AttentionTransfer
from mome_rec.modules.baselines import MixtureOverArch, SharedBottomOverArch, SingleTaskOverArch
from mome_rec.modules.experts import ExpertGroup, ExpertLayer
from mome_rec.modules.gates import TaskGates
from mome_rec.modules.masks import hard_mask, l0_penalty, relaxed_mask
from mome_rec.modules.mome import MoMEOverArch
from mome_rec.modules.mome_layer import MoMELayer
from mome_rec.modules.over_arch import OVER_ARCHS, OverArch, build_over_arch, register_over_arch
from mome_rec.modules.ple import CGCLevel, PLEOverArch
from mome_rec.modules.tower import Tower

__all__ = [
    "OVER_ARCHS",
    "AITMOverArch",
    "AttentionTransfer",
    "CGCLevel",
    "ExpertGroup",
    "ExpertLayer",
    "MixtureOverArch",
    "MoMEOverArch",
    "MoMELayer",
    "OverArch",
    "PLEOverArch",
    "SharedBottomOverArch",
    "SingleTaskOverArch",
    "TaskGates",
    "Tower",
    "build_over_arch",
    "hard_mask",
    "l0_penalty",
    "register_over_arch",
    "relaxed_mask",
]
