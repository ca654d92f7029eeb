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
    (point,) = json.loads((out / "scale.json").read_text())["points"]
    assert point["nodes"] == 2 and point["children"] == 6 * 4  # 6 iterations x 2 nodes x 2
    assert point["failed"] == 0 and point["trained"] + point["cache_hits"] == point["children"]
    assert 0 < point["efficiency"] <= 1.0 and point["ideal_per_s"] == 2 * 2 / 0.5
    assert point["overhead_ms_median"] is not None and point["overhead_ms_median"] >= 0
    assert set(point["head_bytes_per_child"]) == {"driver", "ChildLog", "RewardCache"}
    # One env runner per child in flight, on the head; the driver keeps < 2 KB per child.
    assert point["actors"]["SingleAgentEnvRunner"]["count"] == 2 * 2
    assert 100 < point["driver_record_bytes_per_child"] < 2048
    assert point["task_arg_bytes_per_child"] > 10_000  # a child network travels with its task
    # The payload (data + teacher logits) was copied to the nodes that ran children, no more.
    assert 1 <= point["payload_copies"] <= 3
    assert "sleep_child" in json.dumps(point["time_by_name"])
    assert (out / "n2-s0.5" / "driver_profile.txt").read_text().strip()
