"""n2n from Python: ``compress()`` and ``baseline()`` on a model object and tensors in memory.

The model here is defined in the test (as a user defines one in a notebook or a script's
``__main__``): it has no importable builder, so its checkpoints carry a snapshot of it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from envs.checkpoint import load_checkpoint
from envs.costs import count_params
from pipeline import baseline, compress
from pipeline.tracking.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """A small residual CNN for 8x8 digits, torchvision-style (a BasicBlock in the middle)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())  # fmt: skip
        self.block = BasicBlock(width, width)
        self.head = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def _trained(digits) -> Net:
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = digits.train
    for _ in range(3):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


TINY = {
    "tracking__enabled": False, "removal__iterations": 1, "removal__episodes_per_iteration": 3,
    "shrinkage__iterations": 2, "shrinkage__episodes_per_iteration": 3, "distill__steps": 20,
    "finetune__steps": 40, "finetune__top_k": 1,
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compress_an_in_memory_model_returns_a_smaller_student_that_reloads_alone(
    ray_cluster, digits, tmp_path: Path
):
    net = _trained(digits)
    sigint = signal.getsignal(signal.SIGINT)
    result = compress(net, digits.train, digits.val, digits.test, compression=3,
                      run_dir=tmp_path / "run", **TINY)  # fmt: skip
    # Tune's search leaves no SIGINT handler behind to swallow the caller's next Ctrl+C.
    assert signal.getsignal(signal.SIGINT) is sigint
    teacher_params = count_params(net)
    assert count_params(result.student) <= teacher_params / 3
    assert result.summary["budget"]["met"] and result.run_dir == (tmp_path / "run").resolve()
    assert any(s.get("best") for s in result.students) and result.mlflow_run_id is None
    # The student reloads from its run directory alone (no Net class needed) ...
    reloaded = load_checkpoint(result.run_dir / "best", num_classes=10).model
    x = digits.test[0][:16]
    assert torch.allclose(reloaded(x), result.student(x), atol=1e-6)
    # ... and measures what the summary says.
    accuracy = (reloaded(digits.test[0]).argmax(1) == digits.test[1]).sum().item() / len(
        digits.test[1]
    )
    assert accuracy == pytest.approx(result.summary["student"]["test_accuracy"], abs=1e-9)
    assert ray_cluster.is_initialized()  # Ray was running before: it is left running


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_baseline_from_python_gives_the_method_student_within_its_budget(
    ray_cluster, digits, tmp_path: Path
):
    net = _trained(digits)
    budget = count_params(net) // 4
    result = baseline("slimming", net, digits.train, digits.val, params=budget,
                      run_dir=tmp_path / "slim", tracking__enabled=False, finetune__steps=40,
                      baseline__compression=[], baseline__sparsity_steps=10)  # fmt: skip
    assert count_params(result.student) <= budget
    assert result.summary["method"] == "slimming" and len(result.students) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: {"train": (d.train[0], d.train[1][:-1])}, "train has 1151 images but labels"),
        (lambda d: {"val": (d.val[0].to(torch.uint8), d.val[1])}, "val images are uint8"),
        (lambda d: {"train": (d.train[0], d.train[1].float())}, "train labels are float32"),
        (lambda d: {"val": (d.val[0], d.val[1] + 5)}, "val labels run from 5 to 14"),
        (lambda d: {"train": (d.train[0][:, 0], d.train[1])}, "give [N, C, H, W]"),
        (lambda d: {"model": nn.Sequential(nn.Flatten(), nn.Linear(64, 5))},
         "labels run from 0 to 9 but the model has 5 outputs"),
        (lambda d: {"model": Untraceable()}, "torch.fx cannot trace the teacher"),
        (lambda d: {"train": Stream(d.train)}, "iterable Dataset"),
    ],
    ids=["lengths", "image-dtype", "label-dtype", "label-range", "shape", "outputs",
         "untraceable", "iterable"],
)  # fmt: skip
def test_bad_input_is_one_value_error_before_ray(change, message, digits, tmp_path: Path):
    import ray

    args = {"model": Net().eval(), "train": digits.train, "val": digits.val}
    args.update(change(digits))
    ray_before = ray.is_initialized()
    with pytest.raises(ValueError) as caught:
        compress(args["model"], args["train"], args["val"], run_dir=tmp_path / "run",
                 tracking__enabled=False)  # fmt: skip
    text = str(caught.value)
    assert message in text and "\n" not in text, text
    assert ray.is_initialized() == ray_before and not (tmp_path / "run").exists()


def test_a_map_style_dataset_and_numpy_arrays_are_data_too(digits):
    from pipeline.api import as_arrays

    pairs = [(digits.val[0][i], int(digits.val[1][i])) for i in range(20)]

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(pairs)

        def __getitem__(self, i):
            return pairs[i]

    x, y = as_arrays(Pairs(), "val")
    assert x.shape == (20, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    x2, y2 = as_arrays((digits.val[0][:20].numpy(), digits.val[1][:20].numpy()), "val")
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, data) -> None:
        self.data = data

    def __iter__(self):
        return iter(zip(*self.data, strict=True))


SCRIPT = """
import sys, torch, ray
from torch import nn
from pipeline import compress
from pipeline.data.datasets import load_dataset

class Net(nn.Module):  # defined in __main__, as in a notebook
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    def forward(self, x):
        return self.body(x)

d = load_dataset("digits", val_fraction=0.2, seed=0)
torch.manual_seed(0)
net = Net()
opt = torch.optim.Adam(net.parameters(), lr=0.01)
for _ in range(2):
    for i in range(0, len(d.train[1]), 64):
        loss = nn.functional.cross_entropy(net(d.train[0][i:i+64]), d.train[1][i:i+64])
        opt.zero_grad(); loss.backward(); opt.step()
print("ray before:", ray.is_initialized(), flush=True)
try:
    compress(net.eval(), d.train, d.val, d.test, compression=3, run_dir=sys.argv[1],
             tracking__enabled=False, removal__iterations=3, removal__episodes_per_iteration=3,
             shrinkage__iterations=1, shrinkage__episodes_per_iteration=3, distill__steps=30,
             finetune__steps=30, finetune__top_k=1)
finally:
    print("ray after:", ray.is_initialized(), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_run_started_from_a_script_continues_with_n2n_run_resume(tmp_path: Path):
    """A plain script (its model class in ``__main__``), no Ray running: compress() starts
    one and stops it again, even when interrupted; ``n2n run --resume`` then finishes the run."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run_dir = tmp_path / "run"
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(RunDir(run_dir).iterations()) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no iteration recorded in time"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "ray before: False" in out and "ray after: False" in out, (out, err[-2000:])
    # The signal lands in a search or in fine-tuning, whichever is running: either way the
    # script stops unfinished (no summary) and the run directory is resumable.
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), (out, err[-2000:])

    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--resume", str(run_dir), "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = RunDir(run_dir)
    assert len(out.children("removal")) == 9 and len(out.children("shrinkage")) == 3
    summary = out.summary()
    assert summary["budget"]["met"]
    student = load_checkpoint(run_dir / "best", num_classes=10).model
    assert count_params(student) == summary["student"]["params"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_readme_example_runs_as_written(tmp_path: Path):
    readme = (REPO / "README.md").read_text()
    code = readme.split("### From Python\n\n```python\n")[1].split("```")[0]
    (tmp_path / "example.py").write_text(code)
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, run_dir = proc.stdout.split()[-2:]
    best = load_checkpoint(Path(run_dir) / "best", num_classes=10)
    assert count_params(best.model) == int(params)
    teacher = load_checkpoint(Path(run_dir) / "teacher", num_classes=10)
    assert int(params) <= count_params(teacher.model) / 4  # compression=4, met
    assert "Configuration for experiment" not in proc.stdout + proc.stderr  # no Tune tables
