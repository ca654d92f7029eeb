"""Training a student longer: the fine-tuning task every method's final students share.

The search's best children (``pipeline.job.finetune``) and the classic methods' students
(``pipeline.baselines``) are all trained by :func:`train_student_task` with the settings of
:func:`finetune_settings`, so that methods compare at equal training cost.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from pipeline.children.kd import KDSettings
from pipeline.children.task import distill_payload
from pipeline.config.schema import RunConfig
from pipeline.torch_utils import evaluate_accuracy


@ray.remote
def train_student_task(
    payload: dict[str, Any],
    model: nn.Module,
    cfg: KDSettings,
    test: tuple[np.ndarray, np.ndarray] | None,
    threads: int,
    bn_l1: float = 0.0,
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """Distils one student (``cfg``'s budget); returns its weights and accuracies.

    Args:
        payload: training/validation data and teacher logits from the object store.
        model: the student, holding the weights it starts from.
        cfg: a ``pipeline.children.kd.KDSettings``.
        test: test images and labels, measured once after training; None skips the test.
        threads: PyTorch threads (the task's CPUs).
        bn_l1: Network Slimming's sparsity term: every BatchNorm scale's gradient gets
            ``bn_l1 * sign(gamma)`` added, the subgradient of ``bn_l1 * sum |gamma|``.
        teacher: the teacher, run on every (augmented) batch when ``cfg.augment`` is set.
    """
    torch.set_num_threads(threads)
    if bn_l1 > 0:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                weight = module.weight
                weight.register_hook(lambda grad, w=weight: grad + bn_l1 * torch.sign(w.detach()))
    if teacher is not None:
        teacher.eval()
    result = distill_payload(model, payload, cfg, teacher=teacher)
    test_acc = None
    if test is not None:
        x, y = torch.as_tensor(test[0]), torch.as_tensor(test[1])
        test_acc = evaluate_accuracy(model.cpu(), x, y)
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "val_accuracy": result.accuracy,
        "test_accuracy": test_acc,
        "kd_steps": result.steps,
        "teacher_forwards": result.steps * cfg.batch_size if cfg.augment != "none" else 0,
        "wall_time_s": result.wall_time_s,
    }


def finetune_settings(cfg: RunConfig, steps: int | None = None) -> KDSettings:
    """The distillation settings of the final training: ``distill`` with ``finetune``'s budget.

    Every method (search students and classic baselines alike) is trained with these, so
    they compare at equal cost; ``steps`` overrides the budget (e.g. a pruning round's).
    """
    return KDSettings.from_dict(
        cfg.distill.as_kwargs(
            cfg.seed,
            steps=steps or cfg.finetune.steps,
            measure_initial=False,
            **cfg.finetune.overrides(),
        )
    )
