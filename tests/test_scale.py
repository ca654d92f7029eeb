"""``benchmarks/scale.py --quick``: the search on two simulated nodes, for real (Ray's
``cluster_utils`` nodes, RLlib, the evaluator's tasks and payload, the reward cache, the child
log, MLflow), with children that sleep instead of training. It checks what the benchmark
reports, not how fast anything is."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _scale():
    spec = importlib.util.spec_from_file_location(
        "benchmarks.scale", REPO / "benchmarks" / "scale.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_scale_simulation_reports_every_figure(tmp_path: Path) -> None:
    import ray

    if ray.is_initialized():  # the simulation builds its own multi-node cluster
        ray.shutdown()
    out = tmp_path / "scale"
    assert _scale().main(["--quick", "--out", str(out)]) == 0
    fast, slow = json.loads((out / "scale.json").read_text())["points"]
    # One search, two phases of 4 iterations: 0.5 s children, then 1 s children.
    assert (fast["child_s"], slow["child_s"]) == (0.5, 1.0) and fast["wall_s"] == slow["wall_s"]
    for point in (fast, slow):
        assert point["nodes"] == 2 and point["children"] == 4 * 4  # 4 iterations x 2 nodes x 2
        assert point["failed"] == 0
        assert point["trained"] + point["cache_hits"] == point["children"]
        assert 0 < point["efficiency"] <= 1.0
        assert point["overhead_ms_median"] is not None and point["overhead_ms_median"] >= 0
        assert set(point["head_bytes_per_child"]) == {"driver", "ChildLog", "RewardCache"}
    assert fast["ideal_per_s"] == 2 * 2 / 0.5 and slow["ideal_per_s"] == 2 * 2 / 1.0
    assert fast["startup_s"] > 0 and slow["startup_s"] is None
    # The phases really slept what they say: each iteration of the second lasts over 1 s.
    assert slow["search_s"] >= 4 * 1.0 and slow["iteration_overhead_s_median"] >= 0
    # One env runner per child in flight, on the head; the driver keeps < 2 KB per child.
    assert fast["actors"]["SingleAgentEnvRunner"]["count"] == 2 * 2
    assert 100 < fast["driver_record_bytes_per_child"] < 2048
    assert fast["task_arg_bytes_per_child"] > 10_000  # a child network travels with its task
    # The payload (data + teacher logits) was copied to the nodes that ran children, no more.
    assert 1 <= fast["payload_copies"] <= 3
    assert "sleep_child" in json.dumps(fast["time_by_name"])
    assert (out / "n2" / "driver_profile.txt").read_text().strip()
