"""Compression methods, one file each. Every module in this package is imported so its ``@register`` runs."""

import importlib
import pkgutil

from kvreviver_core.methods.base import METHODS, CompressedLayer, Method, list_methods, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "CompressedLayer", "Method", "list_methods", "register"]
