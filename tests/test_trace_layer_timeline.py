"""benchmarks/trace_layer_timeline.py: a layer step's kernels placed on the timeline from a profiler trace, and a
one-line error (exit 2) for a file it cannot use."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "trace_layer_timeline.py"


def write_trace(path: Path, steps: list[list[tuple[str, float, float]]]) -> None:
    """A Chrome trace of GPU kernels ``(name, start, duration)``, each step 1000 µs after the last, plus a CPU op."""
    events = [{"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 5.0}]
    for i, step in enumerate(steps):
        events += [{"cat": "kernel", "name": name, "ts": 1000.0 * i + start, "dur": dur, "tid": 7}
                   for name, start, dur in step]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def run(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(path)], capture_output=True, text=True, timeout=60)


def test_each_kernel_of_a_step_is_placed_from_the_steps_append(tmp_path):
    def step(bucket_sums_start: float) -> list[tuple[str, float, float]]:
        return [("_append", 0.0, 4.0), ("_decode_split", 5.0, 30.0), ("_decode_split", 5.5, 4.0),
                ("_position_pass", bucket_sums_start, 10.0), ("_combine", 40.0, 3.0), ("_position_pass", 44.0, 7.0),
                ("nvjet_gemm", 50.0, 12.0), ("nvjet_gemm", 70.0, 12.0)]

    trace = tmp_path / "kvreviver.json.gz"
    write_trace(trace, [step(20.0), step(22.0), step(30.0), step(26.0)])  # the last step has no period: left out
    done = run(trace)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2:5] for line in done.stdout.splitlines()
            if line.startswith("| `")}
    assert "3 layer steps, median period 1000.0 µs" in done.stdout
    assert [float(x) for x in rows["_position_pass#1"][1:]] == [22.0, 32.0]  # the median of 20, 22, 30 (not their mean)
    assert [float(x) for x in rows["_position_pass#2"][1:]] == [44.0, 51.0]
    assert [float(x) for x in rows["_decode_split#2"][1:]] == [5.5, 9.5]
    assert [float(x) for x in rows["next model kernel"][1:]] == [50.0, 62.0]  # the first one only
    assert int(rows["_combine#1"][0]) == 3


def test_a_trace_without_kvreviver_steps_or_a_broken_file_is_a_one_line_error(tmp_path):
    full = tmp_path / "full.json.gz"
    write_trace(full, [[("flash_fwd", 0.0, 100.0)], [("flash_fwd", 0.0, 100.0)]])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path in (full, broken, tmp_path / "missing.json.gz"):
        done = run(path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("trace_layer_timeline:")


def replay(t0: float, vague_end: float) -> list[dict]:
    """One graph replay of benchmark 1's attention as ``profile_decode_kernels.py --timeline`` traces it."""
    # the exact splits, then the bucket logits (programs of the same kernel), the Vague logits and the combine
    kernels = [("flush", 0.0, 50.0), ("_decode_split", 60.0, 30.0), ("_decode_split", 60.5, 4.0),
               ("_vague_logits", 65.0, vague_end - 65.0), ("_combine", 91.0, 2.0)]
    return [{"name": name, "ts": t0 + start, "dur": dur} for name, start, dur in kernels]


def test_each_replay_is_placed_from_its_first_kernel_after_the_flush():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from trace_layer_timeline import replay_spans

    spans = replay_spans(replay(0.0, 80.0) + replay(1000.0, 90.0) + replay(2000.0, 85.0), calls=3)
    assert set(spans) == {"_decode_split#1", "_decode_split#2", "_vague_logits#1", "_combine#1"}  # no flush
    assert spans["_decode_split#1"] == (0.0, 30.0)
    assert spans["_decode_split#2"] == (0.5, 4.5)
    assert spans["_vague_logits#1"] == (5.0, 25.0)  # the median end of 20, 30 and 25
    assert spans["_combine#1"] == (31.0, 33.0)
    with pytest.raises(SystemExit, match="not the same number"):
        replay_spans(replay(0.0, 80.0) + replay(1000.0, 90.0)[:-1], calls=2)
