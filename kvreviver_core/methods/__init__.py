"""Compression methods, one file each, found through the registry in :mod:`kvreviver_core.methods.base`."""

from kvreviver_core.methods.base import METHODS, CompressedLayer, Method, list_methods, register
from kvreviver_core.methods import full, reviver  # noqa: F401  (registration)

__all__ = ["METHODS", "CompressedLayer", "Method", "list_methods", "register"]
