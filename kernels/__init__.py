"""Triton kernels, one file per op (``kernels/<op>.py``), imported as ``dsrb.kernels``.

Triton is optional and imported lazily by the ``triton`` backend; this version ships no Triton kernel yet, so
``python -m dsrb.info`` reports the backend as not available and every op runs on the ``torch`` backend.
"""
