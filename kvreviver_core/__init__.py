"""kvreviver: reversible KV-cache compression (KVReviver) and the baselines it is compared with."""

from kvreviver_core.budget import Budget
from kvreviver_core.cache import CompressedCache, make_cache
from kvreviver_core.methods import list_methods

__all__ = ["Budget", "CompressedCache", "make_cache", "list_methods"]
__version__ = "0.1.0"
