"""Method specs: ``name`` or ``name:key=value:key=value``, a method with its options (and Budget fields), as every
command takes them (``kvreviver:combine=mean``, ``kvreviver:split=0.2/0.4/0.4``)."""

from __future__ import annotations

from kvreviver_core.budget import Budget
from kvreviver_core.methods import METHODS, list_methods


def method_spec(spec: str) -> tuple[str, dict]:
    """``"kvreviver:estimator=mean:split=0.2/0.4/0.4"`` -> ``("kvreviver", {"estimator": "mean", "split": (0.2,
    0.4, 0.4)})``, checked: the method's own options and the Budget fields it reads (``budget_fields``)."""
    name, *pairs = spec.split(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"method option {pair!r} in {spec!r} is not key=value")
        options[key] = _option_value(value)
    budget_options, own_options = METHODS[name].split_options(options)
    # Bad values fail now, not after an hour of grid.
    Budget.coerce(1.0, **budget_options)
    METHODS[name](**own_options)
    return name, options


def _option_value(text: str):
    if "/" in text:  # a tuple such as a split, V/C/R (commas and colons already separate methods and options)
        try:
            return tuple(float(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"option value {text!r} is not numbers separated by /") from None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
