"""The fused ops of DSRB, one public function each, dispatched to a backend.

``semantic_attention``, ``instance_blend``, ``prototype_blend``, ``quadrant_index`` and ``prototype_bank_update``
take ``backend="auto"`` (the first available of cuda -> triton -> torch on GPU, cpu -> torch on CPU) or a backend
name; the environment variable ``DSRB_BACKEND`` forces one wherever ``backend`` is left at ``"auto"``. Every backend
implementation is a ``torch.library`` custom op (namespace ``dsrb``) with a fake implementation and autograd, so
``torch.compile(fullgraph=True)`` traces the model without graph breaks (:func:`trace_torch_backend` makes it trace the
``torch`` backend's PyTorch code instead). Every implementation returns contiguous outputs whatever the input strides,
which is what its fake implementation declares. Oracles with the same names and signatures live in
:mod:`dsrb.reference`. ``prototype_bank_update_`` is the in-place form of ``prototype_bank_update`` that the prototype
bank uses.
"""

from ._registry import (BACKEND_CHOICES, KNOWN_BACKENDS, OPS, check_backend_choice, reasons, select, selected_backend,
                        trace_torch_backend)
from .instance_blend import instance_blend
from .prototype_bank_update import prototype_bank_update, prototype_bank_update_
from .prototype_blend import prototype_blend
from .quadrant_index import quadrant_index
from .semantic_attention import semantic_attention

__all__ = [
    "semantic_attention",
    "instance_blend",
    "prototype_blend",
    "quadrant_index",
    "prototype_bank_update",
    "prototype_bank_update_",
    "reasons",
    "select",
    "selected_backend",
    "check_backend_choice",
    "trace_torch_backend",
    "OPS",
    "BACKEND_CHOICES",
    "KNOWN_BACKENDS",
]
