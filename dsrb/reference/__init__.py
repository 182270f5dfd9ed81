"""Oracles: the official DSRB formulation written plainly, as a reader of the spec would check it line by line.

These are not a backend. They materialise the official (B, H, W, C, D) tensors on purpose; every backend of every
op, and the fused model, is tested against them. The op functions share the names and signatures of
:mod:`dsrb.ops` (without ``backend``).
"""

from . import losses
from .instance_blend import instance_blend, instance_blend_map
from .model import ReferenceDSRB
from .prototype_bank_update import compute_prototype_maps, prototype_bank_update
from .prototype_blend import prototype_blend, prototype_blend_map, select_labels
from .quadrant_index import quadrant_index, quadrant_index_map
from .semantic_attention import semantic_attention, semantic_decoupling_official

__all__ = [
    "ReferenceDSRB",
    "losses",
    "semantic_attention",
    "semantic_decoupling_official",
    "instance_blend",
    "instance_blend_map",
    "prototype_blend",
    "prototype_blend_map",
    "select_labels",
    "quadrant_index",
    "quadrant_index_map",
    "prototype_bank_update",
    "compute_prototype_maps",
]
