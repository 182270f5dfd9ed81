"""DSRB (Pu et al., ESWA 2024): multi-label image recognition with partial labels, with fused ops.

``import dsrb`` is cheap: each submodule is imported on first use (``dsrb.models``, ``dsrb.losses``, ``dsrb.metrics``,
``dsrb.ops``, ``dsrb.data``, ``dsrb.inference``, ``dsrb.compat``, ``dsrb.checkpoint``, ``dsrb.config``,
``dsrb.reference``, and the tools ``dsrb.train``, ``dsrb.evaluate``, ``dsrb.predict``, ``dsrb.visualize``,
``dsrb.pretrain``, ``dsrb.info``, ``dsrb.experiments``). README.md is the user's guide.
"""

from .version import __version__

__all__ = ["__version__"]

# Public submodules, imported on first use (``import dsrb`` stays cheap: the ops build or load the C++ extension), so
# that ``import dsrb; dsrb.inference.load_model(...)`` works as the README writes it.
_SUBMODULES = ("checkpoint", "compat", "config", "data", "evaluate", "experiments", "inference", "info", "losses",
               "metrics", "models", "ops", "predict", "pretrain", "reference", "train", "visualize")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dsrb' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
