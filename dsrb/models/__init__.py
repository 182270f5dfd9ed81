"""DSRB model components: backbone, semantic decoupling, gated GNN, prototype bank and the full model."""

from .dsrb import DSRB, DSRBOutput, ElementWiseLinear, draw_prototype_choices
from .gnn import GatedGNN
from .graph import label_graph
from .prototype_bank import PrototypeBank
from .resnet import build_backbone
from .semantic import SemanticDecoupling

__all__ = [
    "DSRB",
    "DSRBOutput",
    "ElementWiseLinear",
    "SemanticDecoupling",
    "GatedGNN",
    "label_graph",
    "PrototypeBank",
    "draw_prototype_choices",
    "build_backbone",
]
