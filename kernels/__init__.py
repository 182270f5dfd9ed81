"""Triton kernels, one file per op (``kernels/<op>.py``, with the host helpers they share in ``_launch.py``),
imported as ``dsrb.kernels``.

Triton is optional: the ``triton`` backend (``dsrb/ops``) imports these modules lazily, on CUDA tensors only; on a
machine without a GPU the tests run them under the Triton interpreter (``TRITON_INTERPRET=1``).
"""
