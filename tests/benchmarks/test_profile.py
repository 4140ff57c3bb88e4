"""The profiler summary counts only the last run, by operator type."""

from __future__ import annotations

from edgediff.benchmarks.profile import op_times, profile


def test_op_times_takes_the_last_run():
    def node(op, ts, dur):
        return {"cat": "Node", "name": f"{op}_1_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    trace = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100}, node("Conv", 10, 50_000),
             {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100}, node("Conv", 210, 2000),
             node("MatMul", 220, 3000), node("MatMul", 230, 1000),
             {"cat": "Node", "name": "MatMul_1_fence_before", "ts": 240, "dur": 9, "args": {"op_name": "MatMul"}}]
    assert op_times(trace) == {"Conv": 2.0, "MatMul": 4.0}


def test_profile_runs_on_a_package(tiny_package):
    wall, ops = profile(tiny_package("sd1"), "unet", 64, threads=1)
    assert wall > 0 and ops and "Conv" in ops
