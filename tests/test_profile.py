"""`kvreviver profile`: the memory sampler, the OOM and max-batch harness, and the CPU path end to end."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from typer.testing import CliRunner

from kvreviver_cli import profile_cmd
from kvreviver_core.models import ARCH_PRESETS
from kvreviver_core import profiling
from kvreviver_core.profiling import PeakSampler, ProfileRow, find_max_batch, guarded, is_out_of_memory

CPU = torch.device("cpu")
TINY = ["--device", "cpu", "--arch", "tiny", "--random-weights"]


class FakeMemory:
    """A reading source: plays ``values`` in order, then repeats the last one; records when it was read."""

    def __init__(self, values: list[int]) -> None:
        self.values = list(values)
        self.times: list[float] = []
        self.exhausted = threading.Event()

    def __call__(self) -> int:
        self.times.append(time.monotonic())
        index = len(self.times) - 1
        if index >= len(self.values) - 1:
            self.exhausted.set()
        return self.values[min(index, len(self.values) - 1)]


# -- the sampler -----------------------------------------------------------------------------------------------------
def test_sampler_keeps_the_peak_between_baseline_and_end():
    memory = FakeMemory([100, 120, 900, 300, 150])
    sampler = PeakSampler(memory, interval_s=0.001).start()
    assert memory.exhausted.wait(5.0), "the sampler thread never read the source"
    assert sampler.stop() == 900
    assert sampler.baseline_bytes == 100
    assert sampler.samples == len(memory.times)


def test_sampler_catches_a_spike_only_at_the_final_reading():
    # Start and stop read synchronously, so a region shorter than the interval is still covered at both ends.
    memory = FakeMemory([100, 700])
    sampler = PeakSampler(memory, interval_s=60.0).start()
    assert sampler.stop() == 700
    assert len(memory.times) == 2


def test_sampler_stop_joins_the_thread_and_reading_stops():
    memory = FakeMemory([1, 2, 3])
    with PeakSampler(memory, interval_s=0.002) as sampler:
        time.sleep(0.05)
        assert sampler.running
    assert not sampler.running
    reads = len(memory.times)
    time.sleep(0.05)
    assert len(memory.times) == reads


def test_sampler_reads_at_its_interval():
    memory = FakeMemory([5])
    interval = 0.05
    sampler = PeakSampler(memory, interval_s=interval).start()
    time.sleep(0.5)
    sampler.stop()
    gaps = [b - a for a, b in zip(memory.times[1:-2], memory.times[2:-1])]  # thread readings only
    assert 4 <= len(memory.times) - 2 <= 11, memory.times
    assert min(gaps) >= 0.8 * interval, gaps


def test_sampler_reraises_a_failing_source():
    calls = {"n": 0}

    def broken() -> int:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("driver went away")
        return 10

    sampler = PeakSampler(broken, interval_s=0.001).start()
    time.sleep(0.05)
    with pytest.raises(OSError, match="driver went away"):
        sampler.stop()


@pytest.mark.parametrize("interval", [0, -0.01, float("nan")])
def test_sampler_rejects_a_bad_interval(interval):
    with pytest.raises(ValueError, match="interval"):
        PeakSampler(lambda: 0, interval_s=interval)


# -- OOM and max batch ----------------------------------------------------------------------------------------------
def _fake_step(max_fitting: int, calls: list[int]):
    def step(batch: int) -> ProfileRow:
        calls.append(batch)
        if batch > max_fitting:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return ProfileRow("full", batch, "ok", decode_tokens_per_s=float(batch))

    return step


def test_guarded_turns_out_of_memory_into_a_row():
    calls: list[int] = []
    step = _fake_step(4, calls)
    assert guarded(step, "full", 4, CPU).ok
    row = guarded(step, "full", 8, CPU)
    assert (row.status, row.batch, row.decode_tokens_per_s) == ("oom", 8, None)


def test_guarded_lets_other_errors_through():
    def broken(batch: int) -> ProfileRow:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        guarded(broken, "full", 1, CPU)
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("true_max", [0, 1, 2, 5, 37, 64, 1000, 1024, 5000])
def test_find_max_batch_doubles_then_bisects(true_max):
    calls: list[int] = []

    def fits(batch: int) -> bool:
        calls.append(batch)
        return batch <= true_max

    found = find_max_batch(fits, 1, 1024)
    assert found == min(true_max, 1024)
    assert len(calls) == len(set(calls)), f"a batch was tried twice: {calls}"
    assert len(calls) <= 2 * 10 + 1, calls  # log2(1024) doublings + as many bisection steps


def test_find_max_batch_starts_from_a_batch_known_to_fit():
    calls: list[int] = []
    found = find_max_batch(lambda b: calls.append(b) or b <= 40, start=16, limit=1024)
    assert found == 40
    assert calls[0] == 32 and min(calls) > 16


# -- the command ----------------------------------------------------------------------------------------------------
def _invoke(args: list[str]):
    from kvreviver_cli.app import app  # here, so the GPU test needs no other command's dependencies

    return CliRunner().invoke(app, ["profile", *args])


def test_profile_on_cpu_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--batch", "1,2", "--context", "40", "--new-tokens", "6", "--out", str(out)]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert "NVML memory is unavailable on cpu" in result.output
    report = json.loads((out / "profile.json").read_text())
    rows = {(r["method"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {("full", 1), ("full", 2), ("kvreviver", 1), ("kvreviver", 2)}
    tiny = ARCH_PRESETS["tiny"]
    head_dim = tiny["hidden_size"] // tiny["num_attention_heads"]
    token_bytes = tiny["num_hidden_layers"] * 2 * tiny["num_key_value_heads"] * head_dim * 4  # fp32 K and V
    for batch in (1, 2):
        full, reviver = rows[("full", batch)], rows[("kvreviver", batch)]
        assert full["kv_bytes"] == batch * (40 + 6) * token_bytes
        # At 40 tokens the sketch's one-bucket minimum and the scores' metadata weigh a lot; still well under full.
        assert 0 < reviver["kv_bytes"] < 0.25 * full["kv_bytes"]
        for row in (full, reviver):
            assert row["status"] == "ok" and row["decode_steps_timed"] == 2
            assert row["decode_tokens_per_s"] == pytest.approx(batch * 2 / row["decode_s"])
            assert row["nvml_peak_bytes"] is None and row["torch_max_allocated_bytes"] is None
    lines = (out / "profile.jsonl").read_text().splitlines()
    # A rerun with the same setup reuses every finished row.
    again = _invoke(args)
    assert again.exit_code == 0, again.output
    assert (out / "profile.jsonl").read_text().splitlines() == lines


def test_profile_compile_runs_every_method_on_the_compiled_model(tmp_path):
    """``--compile``: the setup records how many blocks were compiled (the 2 decoder layers and the final norm),
    and both methods decode through them with the uncompiled run's token rows and KV bytes."""
    rows = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flag else "plain")
        result = _invoke([*TINY, "--batch", "1", "--context", "40", "--new-tokens", "3", "--out", str(out), *flag])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "profile.json").read_text())
        rows[bool(flag)] = {r["method"]: r for r in report["rows"]}
        assert report["setup"].get("compiled_blocks") == (3 if flag else None)
    for method in ("full", "kvreviver"):
        assert rows[True][method]["status"] == "ok"
        assert rows[True][method]["kv_bytes"] == rows[False][method]["kv_bytes"]


def test_profile_takes_method_specs(tmp_path):
    """A method with options (``name:key=value``) is made with them and labelled by its whole spec."""
    out = tmp_path / "run"
    result = _invoke([*TINY, "--methods", "full,kvreviver:combine=mean:split=0.2/0.4/0.4", "--context", "40",
                      "--new-tokens", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads((out / "profile.json").read_text())["rows"]}
    assert set(rows) == {"full", "kvreviver:combine=mean:split=0.2/0.4/0.4"}
    spec = rows["kvreviver:combine=mean:split=0.2/0.4/0.4"]
    assert spec["status"] == "ok" and 0 < spec["kv_bytes"] < rows["full"]["kv_bytes"]


def test_profile_reports_oom_rows_and_keeps_going(monkeypatch, tmp_path):
    def fake_measure(model, spec, batch, memory=None):
        if spec.method == "full" and batch > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return ProfileRow(spec.method, batch, "ok", prefill_s=0.1, decode_s=1.0, decode_steps_timed=1,
                          decode_tokens_per_s=float(batch), kv_bytes=batch, kv_full_bytes=10 * batch)

    monkeypatch.setattr(profiling, "measure_run", fake_measure)  # the command imports it when it runs
    result = _invoke([*TINY, "--batch", "2,4", "--find-max-batch", "--max-batch-limit", "64", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "profile.json").read_text())
    status = {(r["method"], r["batch"]): r["status"] for r in report["rows"]}
    assert status == {("full", 2): "ok", ("full", 4): "oom", ("kvreviver", 2): "ok", ("kvreviver", 4): "ok"}
    assert report["max_batch"] == {"full": 3, "kvreviver": 64}
    assert "OOM" in result.output
    assert "full: largest batch that fits = 3" in result.output


def test_profile_reads_a_config_file(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('[profile]\narch = "tiny"\nrandom-weights = true\nmethods = ["full"]\nbatch = [3]\n'
                      'context = 24\nnew-tokens = 3\ndevice = "cpu"\n')
    result = _invoke(["--config", str(config), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    assert [(r["method"], r["batch"], r["decode_steps_timed"]) for r in rows] == [("full", 3, 1)]


def test_sample_configs_hold_the_papers_table1_setup_and_only_profile_options():
    import inspect
    from pathlib import Path

    from kvreviver_cli.config import load_toml

    configs = Path(__file__).resolve().parents[1] / "sample_configs"
    options = set(inspect.signature(profile_cmd.profile_command).parameters) - {"ctx"}
    table1 = load_toml(configs / "paper-table1-throughput.toml", "profile")
    assert table1 == {"arch": "llama-2-7b", "random_weights": True, "methods": "full,kvreviver,kvreviver:combine=mean",
                      "budget": 0.1, "batch": "1,2,8,16", "context": 2048, "new_tokens": 128, "device": "cuda"}
    offline = load_toml(configs / "smollm2-offline.toml", "profile")
    assert set(table1) <= options and set(offline) <= options
    assert offline["device"] == "cpu" and "arch" not in offline and "model" not in offline  # the embedded model


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "0"], "--batch"),
        (["--batch", "1,x"], "--batch"),
        (["--methods", "full,nosuch"], "unknown method"),
        (["--methods", "full,kvreviver:combine=max"], "unknown row combine"),
        (["--methods", "full,kvreviver:bogus=1"], "has no option bogus"),
        (["--budget", "0"], "--budget"),
        (["--budget", "1.5"], "--budget"),
        (["--context", "9000"], "positions"),
        (["--cuda-graphs"], "--cuda-graphs"),
    ],
)
def test_profile_bad_input_exits_2_with_one_line(extra, message):
    result = _invoke([*TINY, "--context", "16", "--new-tokens", "2", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_profile_names_the_methods_that_stayed_eager_under_cuda_graphs():
    rows = [ProfileRow("kvreviver", 1, "ok", decode_graph_replays=29), ProfileRow("h2o", 1, "ok", decode_graph_replays=0),
            ProfileRow("h2o", 4, "oom"), ProfileRow("full", 1, "ok")]  # full: run without --cuda-graphs (None)
    lines = profile_cmd.eager_under_graphs(rows)
    assert len(lines) == 1 and lines[0].startswith("h2o:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_profile_without_a_gpu_asks_for_device_cpu():
    result = _invoke(["--arch", "tiny", "--random-weights"])
    assert result.exit_code == 2
    assert "--device cpu" in result.output and len(result.output.strip().splitlines()) == 1


# -- the real NVML path (GPU machine only) -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvml_sampler_sees_a_real_allocation():
    from kvreviver_core.profiling import nvml_reader, release_memory

    device = torch.device("cuda")
    torch.empty(16, dtype=torch.uint8, device=device).fill_(1)  # CUDA context and the fill kernel, before the baseline
    release_memory(device)
    torch.cuda.synchronize()
    sampler = PeakSampler(nvml_reader(device), interval_s=0.01).start()
    block = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device).fill_(1)  # 2 GiB, touched
    torch.cuda.synchronize()
    time.sleep(0.1)
    del block
    release_memory(device)
    time.sleep(0.05)
    peak = sampler.stop()
    grew = peak - sampler.baseline_bytes
    assert 1.95 * 1024**3 <= grew <= 2.25 * 1024**3, grew
    assert sampler.samples >= 10


def test_memory_savings_lines_survive_a_run_nvml_saw_no_growth_in():
    """A tiny model can decode inside memory NVML already counted: the line says so instead of dividing by 0."""
    from kvreviver_cli.profile_cmd import memory_savings
    from kvreviver_core.profiling import ProfileRow

    def row(method, peak, kv):
        return ProfileRow(method, 2, "ok", kv_bytes=kv, nvml_baseline_bytes=1 << 30, nvml_peak_bytes=(1 << 30) + peak)

    flat = memory_savings([row("full", 0, 1000), row("kvreviver", 0, 100)], ["full", "kvreviver"])
    assert flat == ["batch 2: kvreviver NVML peak above the loaded model 0.00 GiB vs full 0.00 GiB (full grew by "
                    "nothing NVML saw); KV held 0.100x"]
    grown = memory_savings([row("full", 4 << 30, 1000), row("kvreviver", 1 << 30, 100)], ["full", "kvreviver"])
    assert "(0.25x); KV held 0.100x" in grown[0]
