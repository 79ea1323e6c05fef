"""Offline calibration shared by the methods that learn from a model's own keys and values (vector, echokv).

One mechanism for every calibrated method:

1. :func:`collect` runs the model over a text sample (default: the builtin prose of ``pydoc_data.topics``) in
   fixed-length chunks with a recording cache, and keeps every layer's keys and values as the cache would store
   them (after RoPE) and, if asked, the queries.
2. The method's own fit function (registered with :func:`calibrator`) turns those activations into a few tensors.
3. :func:`save_calibration` writes them as one small safetensors file, with a JSON of the settings next to it
   (same name, ``.json``). The default place is ``cache_dir()/calibration/<model>-<fingerprint>/<method>.safetensors``,
   so a method finds its calibration for a model without being told a path (:func:`load_calibration`).

Positions: keys are stored rotated by RoPE, and a rotation depends on the position, so any linear map that should
hold at every position is fitted and applied in the *unrotated* frame (:class:`RopeFrame`). Positions follow
``generate``'s convention for left padding: slot ``i`` of a sequence with ``o`` pads is at position ``i - o``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from kvreviver_core.models import cache_dir

CALIBRATION_CHUNK = 512  # tokens per calibration sequence: long enough for real attention patterns, cheap on a CPU
CALIBRATION_TOKENS = 4096
HELDOUT_EVERY = 5  # every 5th builtin section is held out from calibration (benchmarks evaluate on those)

ProgressFn = Callable[[str, int, int, float | None], None]
"""``progress(stage, done, total, loss)``: called as work advances; ``loss`` is None outside training."""


# -- text -----------------------------------------------------------------------------------------------------------
def builtin_prose(part: str = "calibration") -> str:
    """CPython's ``pydoc_data.topics`` prose: ``"calibration"`` (4 of every 5 sections) or ``"heldout"`` (the rest)."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"builtin prose part must be 'calibration' or 'heldout', got {part!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [i % HELDOUT_EVERY == HELDOUT_EVERY - 1 for i in range(len(names))]
    return "\n\n".join(topics[name] for name, is_held in zip(names, held) if is_held == (part == "heldout"))


def read_text(path: Path | str | None) -> tuple[str, str]:
    """The calibration text and a description of where it came from."""
    if path is None:
        return builtin_prose("calibration"), "builtin:pydoc_data.topics(calibration part)"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"text file {path} is not UTF-8 text") from None
    return text, str(path)


# -- activations ----------------------------------------------------------------------------------------------------
@dataclass
class Activations:
    """Per layer, what the cache stores for ``chunks`` calibration sequences of ``T`` tokens each.

    keys, values: one ``(chunks, kv_heads, T, head_dim)`` fp32 tensor per layer (keys rotated by RoPE).
    queries: one ``(chunks, q_heads, T, head_dim)`` fp32 tensor per layer (rotated), or None when not recorded.
    Every chunk starts at position 0, so the positions of a chunk are ``arange(T)``.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor] | None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers, kv_heads, T, head_dim)."""
        return len(self.keys), self.keys[0].shape[1], self.keys[0].shape[2], self.keys[0].shape[3]

    def split(self, heldout_chunks: int) -> tuple["Activations", "Activations"]:
        """(train, heldout): the last ``heldout_chunks`` chunks are held out."""
        n = self.keys[0].shape[0]
        if not 0 < heldout_chunks < n:
            raise ValueError(f"need at least 2 calibration chunks to hold one out, got {n}")
        cut = n - heldout_chunks
        part = lambda xs, sl: None if xs is None else [x[sl] for x in xs]  # noqa: E731
        train = Activations(part(self.keys, slice(0, cut)), part(self.values, slice(0, cut)), part(self.queries, slice(0, cut)))
        held = Activations(part(self.keys, slice(cut, n)), part(self.values, slice(cut, n)), part(self.queries, slice(cut, n)))
        return train, held


def _recording_layer_class():
    from kvreviver_core.methods.full import FullLayer

    class RecordingLayer(FullLayer):
        """A full layer that also remembers the queries its attention call receives."""

        queries: torch.Tensor | None = None

        def fused_attention(self, query, key, value, mask, scaling):
            self.queries = query.detach()
            return None  # attention itself runs as usual

    return RecordingLayer


def calibration_ids(tokenizer, text: str, tokens: int = CALIBRATION_TOKENS, chunk: int = CALIBRATION_CHUNK) -> torch.Tensor:
    """``(chunks, chunk)`` token ids: the first ``tokens`` tokens of ``text`` cut into sequences of ``chunk``."""
    if chunk < 2 or tokens < 2 * chunk:
        raise ValueError(f"calibration needs at least 2 chunks of {chunk} tokens; asked for {tokens} tokens")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    chunks = min(tokens, ids.numel()) // chunk
    if chunks < 2:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens; it needs at least {2 * chunk} (2 chunks of {chunk})"
        )
    return ids[: chunks * chunk].view(chunks, chunk)


@torch.no_grad()
def collect(model, ids: torch.Tensor, with_queries: bool = False, progress: ProgressFn | None = None) -> Activations:
    """Run ``model`` over each row of ``ids`` ``(chunks, T)`` and record every layer's K/V (and Q)."""
    from kvreviver_core import attention
    from kvreviver_core.budget import Budget
    from kvreviver_core.cache import CompressedCache
    from kvreviver_core.generation import cache_kwargs

    chunks = ids.shape[0]
    device = next(model.parameters()).device
    attention.use_on(model)
    recording = _recording_layer_class()
    layers = model.config.num_hidden_layers
    keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    queries: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    for i in range(chunks):
        cache = CompressedCache("calibration", Budget(1.0), lambda idx: recording(idx, Budget(1.0)))
        model(ids[i : i + 1].to(device), use_cache=True, **cache_kwargs(model, cache))
        for layer_idx, layer in enumerate(cache.layers):
            keys[layer_idx].append(layer.keys.float().cpu())
            values[layer_idx].append(layer.values.float().cpu())
            if with_queries:
                queries[layer_idx].append(layer.queries.float().cpu())
        if progress:
            progress("collect K/V", i + 1, chunks, None)
    return Activations(
        keys=[torch.cat(k) for k in keys],
        values=[torch.cat(v) for v in values],
        queries=[torch.cat(q) for q in queries] if with_queries else None,
    )


# -- RoPE -----------------------------------------------------------------------------------------------------------
class RopeFrame:
    """Undo and redo the model's rotary embedding on stored keys (``rotate_half`` convention, as in Llama).

    A key stored at position p is ``R(p) k``. A linear map fitted between *unrotated* keys holds at every position;
    one fitted between rotated keys would only keep the part that commutes with every rotation.
    """

    def __init__(self, rotary: torch.nn.Module) -> None:
        self.rotary = rotary

    @classmethod
    def of(cls, model) -> "RopeFrame":
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        if rotary is None:
            raise ValueError(f"{type(model).__name__} has no model.rotary_emb: calibrated methods need a RoPE model")
        return cls(rotary)

    @torch.no_grad()
    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` (long, any shape) -> cos, sin of shape ``positions.shape + (D,)``, unit rotations."""
        flat = positions.clamp(min=0).reshape(1, -1)
        probe = torch.zeros((), dtype=torch.float32, device=positions.device)
        cos, sin = self.rotary(probe, flat)
        norm = torch.sqrt(cos.float() ** 2 + sin.float() ** 2)  # rope scaling multiplies both; a rotation has norm 1
        shape = (*positions.shape, cos.shape[-1])
        # On the positions' device: under a device map the rotary module sits on another layer's GPU.
        place = {"dtype": dtype, "device": positions.device}
        return (cos.float() / norm).reshape(shape).to(**place), (sin.float() / norm).reshape(shape).to(**place)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    @classmethod
    def rotate(cls, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + cls._rotate_half(x) * sin

    @classmethod
    def unrotate(cls, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos - cls._rotate_half(x) * sin


def sequence_positions(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, length)`` positions of the slots of left-padded sequences (pads clamp to 0)."""
    slots = torch.arange(length, device=offsets.device).view(1, -1)
    return (slots - offsets.view(-1, 1)).clamp(min=0)


# -- identity of a model and files on disk -------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """Short hash of the architecture and of a sample of the attention weights (bf16-rounded, so any dtype agrees)."""
    config = model.config
    fields = {k: getattr(config, k, None) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "rope_theta", "vocab_size")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    attn = model.model.layers[0].self_attn
    for proj in (attn.k_proj, attn.v_proj):
        sample = proj.weight.detach().flatten()[:4096].to(torch.bfloat16).float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:12]


def model_label(model) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "model")
    stem = Path(name.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60]


def default_weights_path(model, method: str) -> Path:
    return cache_dir() / "calibration" / f"{model_label(model)}-{model_fingerprint(model)}" / f"{method}.safetensors"


def settings_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_calibration(path: Path, tensors: dict[str, torch.Tensor], settings: dict) -> Path:
    """Write ``path`` (safetensors) and its settings JSON; each is written aside and renamed, so a kill loses nothing."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial))
    json_partial = settings_path(path).with_name(settings_path(path).name + ".partial")
    json_partial.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    partial.replace(path)
    json_partial.replace(settings_path(path))
    return path


def load_calibration(path: Path | str | None, method: str, model) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, settings)`` of ``method``'s calibration for ``model``; a clear one-line ValueError otherwise."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_weights_path(model, method)
    command = f"kvreviver calibrate --method {method}" + ("" if path == default_weights_path(model, method) else f" --out {path}")
    if not path.is_file() or not settings_path(path).is_file():
        raise ValueError(f"{method} weights file {path} not found: create it with `{command}` (add --model for your model)")
    settings = json.loads(settings_path(path).read_text())
    if settings.get("method") != method:
        raise ValueError(f"{path} holds a {settings.get('method')!r} calibration, not {method!r}; run `{command}`")
    if settings.get("fingerprint") != model_fingerprint(model):
        raise ValueError(
            f"{path} was calibrated for another model ({settings.get('model')}, {settings.get('fingerprint')}); "
            f"run `{command}` with this model"
        )
    return load_file(str(path)), settings


# -- the one calibration entry point -------------------------------------------------------------------------------
class Calibrator(Protocol):
    def __call__(self, model, activations: Activations, steps: int | None, progress: ProgressFn | None,
                 **options) -> tuple[dict[str, torch.Tensor], dict]: ...


@dataclass(frozen=True)
class CalibratorSpec:
    fit: Calibrator
    with_queries: bool
    default_steps: int | None  # None: a closed-form fit, which takes no steps


CALIBRATORS: dict[str, CalibratorSpec] = {}


def calibrator(method: str, with_queries: bool, default_steps: int | None) -> Callable[[Calibrator], Calibrator]:
    """Register ``fit(model, activations, steps, progress, **options) -> (tensors, summary)`` for ``method``."""

    def wrap(fit: Calibrator) -> Calibrator:
        CALIBRATORS[method] = CalibratorSpec(fit, with_queries, default_steps)
        return fit

    return wrap


def calibrate(
    method: str,
    model,
    tokenizer,
    text_path: Path | str | None = None,
    steps: int | None = None,
    out: Path | str | None = None,
    tokens: int = CALIBRATION_TOKENS,
    chunk: int = CALIBRATION_CHUNK,
    progress: ProgressFn | None = None,
    **options,
) -> Path:
    """Calibrate ``method`` for ``model`` on a text file (default: the builtin prose); returns the weights' path."""
    spec = calibrator_of(method)
    if steps is not None and spec.default_steps is None:
        raise ValueError(f"{method} is fitted in closed form and takes no --steps")
    path = Path(out) if out is not None else default_weights_path(model, method)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {path}")
    text, source = read_text(text_path)
    return calibrate_on(method, model, calibration_ids(tokenizer, text, tokens, chunk), steps, path, source, progress, **options)


def calibrator_of(method: str) -> CalibratorSpec:
    import kvreviver_core.methods  # noqa: F401  (registers the calibrators)

    if method not in CALIBRATORS:
        raise ValueError(f"method {method!r} takes no calibration; calibrated methods: {', '.join(sorted(CALIBRATORS))}")
    return CALIBRATORS[method]


def calibrate_on(
    method: str,
    model,
    ids: torch.Tensor,
    steps: int | None = None,
    out: Path | str | None = None,
    source: str = "token ids",
    progress: ProgressFn | None = None,
    **options,
) -> Path:
    """Collect activations on ``ids`` ``(chunks, T)``, fit ``method`` and write its weights and settings."""
    spec = calibrator_of(method)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = steps if steps is not None else spec.default_steps
    started = time.perf_counter()
    activations = collect(model, ids, spec.with_queries, progress)
    tensors, summary = spec.fit(model, activations, steps, progress, **options)
    settings = {
        "method": method,
        "model": model_label(model),
        "fingerprint": model_fingerprint(model),
        "text": source,
        "tokens": ids.numel(),
        "chunk": ids.shape[1],
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        **summary,
    }
    return save_calibration(Path(out) if out is not None else default_weights_path(model, method), tensors, settings)


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """``||estimate - target||^2 / ||target - mean(target)||^2`` (1 = no better than the mean; 0 = exact)."""
    spread = (target - target.mean(dim=tuple(range(target.dim() - 1)), keepdim=True)).pow(2).sum()
    return float((estimate - target).pow(2).sum() / spread.clamp_min(1e-30))
