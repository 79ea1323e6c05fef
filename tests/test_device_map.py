"""A model spread over several GPUs (``--device-map auto``): placement, random weights built on their own devices,
every cache's storage on its layer's device, and the profile's memory read on every GPU.

References: the ordinary single-device build (RoPE buffers, weight statistics), accelerate's meta-device sizing
(a 7B model split over two 40 GiB GPUs), hand-written per-GPU readings with a known peak per GPU, and on a 2-GPU
machine the full cache's tokens from the same weights on one GPU.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import defaultdict

import pytest
import torch
from typer.testing import CliRunner

from kvreviver_core import list_methods, make_cache
from kvreviver_core.calibration import calibrate_on
from kvreviver_core.generation import cache_kwargs
from kvreviver_core.methods.base import CompressedLayer, Method
from kvreviver_core.models import (
    ARCH_PRESETS, ModelUnavailable, balanced_device_map, empty_model, module_device, random_model,
)
from kvreviver_core.profiling import PeakSampler, ProfileRow, RunSpec, measure_run, nvml_reader
from tests.conftest import tiny_llama

CALIBRATED = {"vector": {}, "echokv": {"steps": 10, "keep": 0.4}}
BUDGET = 0.5
# echokv's kept heads (keep 0.4) plus its reconstruction weights cost most of a short prompt's full cache.
BUDGETS = {"echokv": 0.9}
# On SmolLM2-135M (30 layers, 3 KV heads of 64) they cost 0.963 of padded_batch's full cache (echokv's own
# ValueError says so at 0.9); at 0.98 a few dropped heads are bought back and most are still rebuilt.
SMOLLM2_BUDGETS = {"echokv": 0.98}


# -- what a cache layer holds ------------------------------------------------------------------------------------
def held_tensors(obj, path: str = "layer") -> list[tuple[str, torch.Tensor]]:
    """Every tensor a cache layer holds: its attributes, through dicts, lists, tuples and kvreviver's own objects
    (a sketch), but not into the method or the other layers it refers to (echokv's layers know their method)."""
    found: list[tuple[str, torch.Tensor]] = []
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif type(obj).__module__.startswith("kvreviver_core") and not isinstance(obj, Method) and (
            path == "layer" or not isinstance(obj, CompressedLayer)):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    else:
        return []
    for name, value in items:
        found.extend(held_tensors(value, name))
    return found


def misplaced(layer: CompressedLayer, device: torch.device) -> list[str]:
    """Names of the tensors ``layer`` holds that are not on ``device`` (nor is the layer's own device)."""
    wrong = [f"{name} on {t.device}" for name, t in held_tensors(layer) if t.device != device]
    return wrong + ([f"layer.device is {layer.device}"] if layer.device != device else [])


def padded_batch(device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 96), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :20], mask[1, :20] = 0, 0
    return ids.to(device), mask.to(device)


def generate(model, method: str, options: dict, device, new_tokens: int = 6, budgets: dict | None = None):
    cache = make_cache(method, (budgets or BUDGETS).get(method, BUDGET), model=model, **options)
    ids, mask = padded_batch(device)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         **cache_kwargs(model, cache))
    return out, cache


def calibrations(model, folder, problems: list[str] | None = None) -> dict[str, dict]:
    """Each calibrated method's options; with ``problems``, a failed calibration is noted there and left out."""
    ids = torch.randint(3, 128, (4, 128), generator=torch.Generator().manual_seed(0))
    options = {}
    for method, settings in CALIBRATED.items():
        try:
            options[method] = {"weights": str(calibrate_on(method, model, ids, out=folder / f"{method}.safetensors",
                                                           **settings))}
        except Exception as exc:
            if problems is None:
                raise
            problems.append(f"{method} calibration: {failure(exc)}")
    return options


def failure(exc: Exception) -> str:
    """The exception and where it was raised, on one line."""
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} (at {where.filename.rsplit('/', 2)[-1]}:{where.lineno} in {where.name})"


def test_every_methods_layers_hold_their_tensors_on_the_key_device(tmp_path):
    model = tiny_llama(layers=4)
    options = calibrations(model, tmp_path)
    assert set(list_methods()) >= {"full", "kvreviver", "streaming", "h2o", "snapkv", "cam", "vector", "echokv"}
    for method in list_methods():
        _, cache = generate(model, method, options.get(method, {}), "cpu")
        assert len(cache.layers) == 4, method
        for layer in cache.layers:
            assert held_tensors(layer), method
            assert misplaced(layer, torch.device("cpu")) == [], method
    # The walk reaches the sketch inside a kvreviver layer, and it flags a stray tensor on another device there.
    _, cache = generate(model, "kvreviver", {}, "cpu")
    layer = cache.layers[1]
    assert any(name.startswith("layer.sketch.") for name, _ in held_tensors(layer))
    layer.sketch.stray = torch.zeros(1, device="meta")
    assert misplaced(layer, torch.device("cpu")) == ["layer.sketch.stray on meta"]


# -- placement and random weights on their devices --------------------------------------------------------------
def test_balanced_map_splits_a_7b_model_over_two_gpus_by_whole_layers():
    model = empty_model("llama-2-7b", torch.bfloat16)
    gib = 1024**3
    placement = balanced_device_map(model, torch.bfloat16, max_memory={0: 40 * gib, 1: 40 * gib})
    layers = [placement[f"model.layers.{i}"] for i in range(32)]  # no layer is cut: each is listed whole
    assert layers == sorted(layers) and 14 <= layers.count(0) <= 18 and layers.count(1) == 32 - layers.count(0)
    assert placement["model.embed_tokens"] == 0 and placement["lm_head"] == 1
    with pytest.raises(ModelUnavailable, match="does not fit"):
        balanced_device_map(model, torch.bfloat16, max_memory={0: 2 * gib, 1: 2 * gib})
    # A tied output layer shares the embedding's weight, so it must sit on the embedding's GPU.
    tied = balanced_device_map(empty_model("smollm2-135m", torch.bfloat16), torch.bfloat16, {0: gib, 1: gib})
    assert tied["lm_head"] == tied["model.embed_tokens"] and set(tied.values()) == {0, 1}


def test_module_device_takes_the_longest_listed_prefix():
    placement = {"model": 0, "model.layers.3": 1, "lm_head": "cpu"}
    assert module_device(placement, "model.layers.3.mlp.up_proj.weight") == torch.device("cuda", 1)
    assert module_device(placement, "model.layers.30.mlp.up_proj.weight") == torch.device("cuda", 0)
    assert module_device(placement, "lm_head.weight") == torch.device("cpu")
    with pytest.raises(ValueError, match="no prefix"):
        module_device(placement, "other.weight")


@pytest.mark.parametrize("tied", [False, True])
def test_random_weights_built_module_by_module_match_the_ordinary_build(monkeypatch, tied):
    monkeypatch.setitem(ARCH_PRESETS, "tiny-test", {**ARCH_PRESETS["tiny"], "tie_word_embeddings": tied})
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    cpu = torch.device("cpu")
    mapped = random_model("tiny-test", torch.float32, cpu, device_map=placement)
    again = random_model("tiny-test", torch.float32, cpu, device_map=placement)
    plain = random_model("tiny-test", torch.float32, cpu)
    held = dict(mapped.named_parameters()) | dict(mapped.named_buffers())
    assert all(t.device == cpu for t in held.values())  # nothing left on the meta device
    assert (mapped.lm_head.weight is mapped.model.embed_tokens.weight) == tied
    assert all(torch.equal(a, b) for a, b in zip(mapped.state_dict().values(), again.state_dict().values()))
    assert torch.equal(mapped.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    assert mapped.model.rotary_emb.inv_freq.dtype == torch.float32
    plain_bf16 = random_model("tiny-test", torch.bfloat16, cpu)
    assert plain_bf16.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE stays fp32 under bf16 weights
    assert plain_bf16.lm_head.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(mapped.named_parameters(), plain.named_parameters()):
        if "norm" in name:
            assert torch.equal(a, torch.ones_like(a)), name
        else:
            assert abs(a.std().item() - b.std().item()) < 0.003 and abs(a.mean().item()) < 0.003, name
    assert not torch.equal(mapped.model.layers[0].mlp.up_proj.weight, torch.zeros_like(plain.model.layers[0].mlp.up_proj.weight))


# -- memory read on every GPU ---------------------------------------------------------------------------------------
class TwoGpuReadings:
    """Plays per-GPU readings in order, then repeats the last; GPU 0 peaks early and GPU 1 late."""

    def __init__(self) -> None:
        self.values = [(100, 200), (150, 900), (800, 300), (120, 210)]
        self.calls = 0

    def __call__(self) -> list[int]:
        self.calls += 1
        return list(self.values[min(self.calls - 1, len(self.values) - 1)])


def test_sampler_keeps_each_gpus_own_peak_and_sums_them():
    readings = TwoGpuReadings()
    sampler = PeakSampler(readings, interval_s=0.001).start()
    deadline = time.monotonic() + 5.0
    while readings.calls < len(readings.values) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sampler.stop() == 800 + 900  # not the peak of the sums (1150): each GPU must hold its own peak
    assert sampler.peak_per_device == (800, 900)
    assert sampler.baseline_per_device == (100, 200) and sampler.baseline_bytes == 300


def test_sampler_refuses_a_reader_whose_device_count_changes():
    values = iter([[1, 2], [1, 2, 3]])
    sampler = PeakSampler(lambda: next(values, [1, 2, 3]), interval_s=60.0).start()
    with pytest.raises(ValueError, match="3 devices, 2 before"):
        sampler.stop()


@torch.no_grad()
def test_measure_run_records_each_gpus_peak_from_a_two_gpu_reader(tiny_model):
    readings = iter([(100, 200)])  # the baseline, then the last reading, which stop() always takes
    spec = RunSpec("full", 1.0, context=16, new_tokens=3, decode_warmup=1)
    row = measure_run(tiny_model, spec, 1, lambda: list(next(readings, (800, 900))))
    assert row.nvml_peak_per_device_bytes == [800, 900] and row.nvml_peak_bytes == 1700
    assert row.nvml_baseline_per_device_bytes == [100, 200] and row.nvml_baseline_bytes == 300


def test_table_shows_the_sum_then_each_gpus_peak_and_keeps_the_single_gpu_cell():
    from kvreviver_cli.profile_cmd import render_table

    gib = 1024**3
    common = dict(prefill_s=0.5, decode_s=1.0, decode_steps_timed=4, decode_tokens_per_s=4.0, kv_bytes=1024**2)
    two = ProfileRow("full", 1, "ok", **common, nvml_peak_bytes=3 * gib, torch_max_allocated_bytes=2 * gib,
                     nvml_peak_per_device_bytes=[gib, 2 * gib], torch_max_allocated_per_device_bytes=[gib // 2, 3 * gib // 2])
    one = ProfileRow("full", 2, "ok", **common, nvml_peak_bytes=gib, torch_max_allocated_bytes=gib // 2,
                     nvml_peak_per_device_bytes=[gib], torch_max_allocated_per_device_bytes=[gib // 2])
    table = render_table([two, one], ["full"], [1, 2], "t")
    peaks = list(table.columns[-1].cells)
    assert peaks == ["3.00/2.00 (1.00+2.00)", "1.00/0.50"]


# -- the command ----------------------------------------------------------------------------------------------------
def _invoke(args: list[str]):
    from kvreviver_cli.app import app

    return CliRunner().invoke(app, ["profile", "--arch", "tiny", "--random-weights", *args])


@pytest.mark.parametrize("extra, message", [
    (["--device-map", "balanced"], "--device-map takes auto"),
    (["--device-map", "auto", "--device", "cpu"], "cannot go with --device cpu"),
])
def test_bad_device_map_exits_2_with_one_line(extra, message):
    result = _invoke(extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_device_map_without_a_gpu_is_one_line_also_from_a_config_file(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('[profile]\ndevice-map = "auto"\n')
    for args in (["--device-map", "auto"], ["--config", str(config)]):
        result = _invoke(args)
        assert result.exit_code == 2, result.output
        assert "no NVIDIA GPU was found" in result.output and len(result.output.strip().splitlines()) == 1


# -- two GPUs --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_every_cache_keeps_each_layer_on_its_gpu_and_full_matches_one_gpu(tmp_path):
    """Every method runs even when another fails: the assertion at the end lists each method's problems at once."""
    cuda0 = torch.device("cuda", 0)
    mapped = random_model("smollm2-135m", torch.bfloat16, cuda0, device_map="auto")
    layer_devices = [next(block.parameters()).device for block in mapped.model.layers]
    assert len(set(layer_devices)) >= 2, layer_devices
    assert all(t.device.type == "cuda" for t in [*mapped.parameters(), *mapped.buffers()])
    # The same layer-by-layer build on one GPU, given the same weights.
    single = random_model("smollm2-135m", torch.bfloat16, cuda0, device_map={"": 0})
    single.load_state_dict(mapped.state_dict())
    assert torch.equal(single.model.rotary_emb.inv_freq.cpu(), mapped.model.rotary_emb.inv_freq.cpu())
    problems: list[str] = []
    options = calibrations(mapped, tmp_path, problems)
    first = mapped.get_input_embeddings().weight.device
    for method in list_methods():
        if method in CALIBRATED and method not in options:
            continue
        try:
            out, cache = generate(mapped, method, options.get(method, {}), first, new_tokens=8, budgets=SMOLLM2_BUDGETS)
        except Exception as exc:
            problems.append(f"{method}: {failure(exc)}")
            continue
        if len(cache.layers) != len(layer_devices):
            problems.append(f"{method}: {len(cache.layers)} cache layers for {len(layer_devices)} model layers")
        wrong_at: dict[str, list[int]] = defaultdict(list)
        for layer, device in zip(cache.layers, layer_devices):
            for wrong in misplaced(layer, device):
                wrong_at[f"{wrong} (its GPU: {device})"].append(layer.layer_idx)
        problems += [f"{method}: {what} in layers {layers}" for what, layers in wrong_at.items()]
        if method == "full":
            try:
                reference, _ = generate(single, "full", {}, cuda0, new_tokens=8)
            except Exception as exc:
                problems.append(f"full on one GPU: {failure(exc)}")
                continue
            differ = (out.cpu() != reference.cpu()).nonzero().tolist()
            if differ:
                row, col = differ[0]
                problems.append(f"full: tokens differ from one GPU's at {len(differ)} places, from row {row} column "
                                f"{col}: {out[row, col:].tolist()} vs {reference[row, col:].tolist()}")
    readings = nvml_reader(sorted(set(layer_devices), key=str))()
    if len(readings) != len(set(layer_devices)) or not all(r > 0 for r in readings):
        problems.append(f"NVML readings {readings} for GPUs {sorted(set(layer_devices), key=str)}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_profile_with_device_map_reads_every_gpu(tmp_path):
    result = _invoke(["--device-map", "auto", "--methods", "full,kvreviver", "--batch", "2", "--context", "64",
                      "--new-tokens", "6", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "profile.json").read_text())
    gpus = len(report["devices"])
    assert gpus >= 2 and report["setup"]["device_map"]["mode"] == "auto"
    for row in report["rows"]:
        assert len(row["nvml_peak_per_device_bytes"]) == gpus
        assert row["nvml_peak_bytes"] == sum(row["nvml_peak_per_device_bytes"])
        assert row["torch_max_allocated_bytes"] == sum(row["torch_max_allocated_per_device_bytes"])
