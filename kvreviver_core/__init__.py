"""kvreviver: reversible KV-cache compression (KVReviver) and the baselines it is compared with.

The public names are imported on first use (PEP 562), so that ``import kvreviver_core.budget`` and the other
torch-free submodules stay light: the cache and the method registry import torch and transformers.
"""

import importlib

_MODULE_OF = {
    "Budget": "kvreviver_core.budget",
    "CompressedCache": "kvreviver_core.cache",
    "make_cache": "kvreviver_core.cache",
    "list_methods": "kvreviver_core.methods",
}

__all__ = list(_MODULE_OF)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # once imported, an ordinary module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
