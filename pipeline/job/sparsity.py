"""The optional sparsity phase before a search (``search.sparsity_steps``).

Network Slimming's lead over a plain search comes from channels chosen by BatchNorm scales
that were trained to be sparse. The sparsity phase gives the search the same start: a copy of
the teacher is distilled from the teacher for a few steps with an L1 penalty on its BatchNorm
scales (``pipeline.children.students.train_student_task``'s ``bn_l1``), saved as
``RUN_DIR/sparse_teacher``, and children are cut from it; the teacher stays the KD target and
the reward's reference. With ``shrinkage.importance: bn`` the shrinkage keeps the channels
whose scales survived the penalty.
"""

from __future__ import annotations

import copy
from typing import Any

import ray
from torch import nn

from envs.checkpoint import save_checkpoint
from envs.costs import model_costs
from pipeline.children.payload import make_payload
from pipeline.children.students import finetune_settings, train_student_task
from pipeline.config.schema import RunConfig
from pipeline.data.teachers import Teacher, load_teacher
from pipeline.job.context import Job

FOLDER = "sparse_teacher"


def sparsity_phase(
    cfg: RunConfig, payload: ray.ObjectRef, teacher: nn.Module, steps: int, l1: float
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``teacher`` after ``steps`` KD steps of the fine-tuning recipe with an L1
    penalty ``l1`` on its BatchNorm scales, as one Ray task; the copy and the task's result."""
    model = copy.deepcopy(teacher)
    settings = finetune_settings(cfg, steps)
    out = ray.get(
        train_student_task.options(
            num_cpus=cfg.ray.cpus_per_child, num_gpus=cfg.ray.gpus_per_child,
            scheduling_strategy="DEFAULT",
        ).remote(
            payload, model, settings, None, max(1, int(cfg.ray.cpus_per_child)), l1,
            teacher if settings.augment != "none" else None,
        )
    )  # fmt: skip
    model.load_state_dict(out["state_dict"])
    return model, out


def sparse_source(job: Job) -> Teacher:
    """The teacher after its sparsity phase: trained now, or the run's own when resuming."""
    cfg, folder = job.cfg, job.run_dir.file(FOLDER)
    if not (folder / "weights.pt").is_file():
        s = cfg.search
        job.say(
            f"[bold]sparsity[/]: {s.sparsity_steps} KD steps with L1 {s.sparsity_l1:g} on the "
            "teacher's BatchNorm scales"
        )
        payload = getattr(job.evaluator_instance, "payload", None)
        if not isinstance(payload, ray.ObjectRef):
            payload = ray.put(make_payload(job.splits, job.teacher.model))
        model, out = sparsity_phase(
            cfg, payload, job.teacher.model, s.sparsity_steps, s.sparsity_l1
        )
        metrics = {"val_accuracy": out["val_accuracy"], "kd_steps": out["kd_steps"],
                   "sparsity_l1": s.sparsity_l1}  # fmt: skip
        save_checkpoint(folder, model, job.teacher.spec, metrics)
    checkpoint = load_teacher(folder, job.splits)
    model = checkpoint.model.eval()
    facts = {**model_costs(model, job.splits.input_shape).as_dict(), **checkpoint.metrics}
    return Teacher(path=folder.resolve(), model=model, spec=checkpoint.spec, facts=facts)
