"""Ray start-up: join a cluster or start a local one sized to the machine, and check that it
can hold a search (one stage trial and at least one child task at once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import ray

from pipeline.config.schema import RunConfig
from pipeline.search.records import runner_cpus

logger = logging.getLogger(__name__)


def init_ray(cfg: RunConfig) -> bool:
    """Joins ``ray.address`` or starts a local cluster; returns whether it started Ray.

    Ray puts the driver's working directory on its workers' ``sys.path`` (on this machine), so
    a custom ``teacher.arch`` or evaluator module there reaches the env runners and child tasks
    without a runtime_env; a remote cluster needs it in the image or the job's working_dir.
    """
    if ray.is_initialized():
        return False
    before = signal.getsignal(signal.SIGTERM)
    if address := ray_address(cfg):
        ray.init(address=address, log_to_driver=False)
    else:  # "local": a new cluster even beside one `ray start` left on this machine, which
        # ray.init() would join instead, and then refuse num_cpus with a ValueError
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            num_gpus=cfg.ray.num_gpus,
            object_store_memory=cfg.ray.object_store_mb * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
        )
    if callable(before) and threading.current_thread() is threading.main_thread():
        # ray.init replaces a SIGTERM handler (the CLI's, which stops like Ctrl+C) with one
        # that exits at once, behind a stack dump: keep the caller's.
        signal.signal(signal.SIGTERM, before)
    return True


def ray_address(cfg: RunConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (set in a Ray job's driver,
    as ``ray.init()`` itself would use it), else None for a new local cluster."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def check_resources(cfg: RunConfig) -> None:
    """Fails when a local cluster cannot hold one stage trial plus one child task at once.

    A joined cluster (``ray.address``) may autoscale, so there a shortfall is only a warning.
    """
    have = ray.cluster_resources()
    need_cpu = runner_cpus(cfg.search.env_runners) * (1 + cfg.search.env_runners)
    need_cpu += cfg.ray.cpus_per_child
    problems = []
    if have.get("CPU", 0) + 1e-9 < need_cpu:
        problems.append(
            f"the Ray cluster has {have.get('CPU', 0):g} CPUs but a search with "
            f"{cfg.search.env_runners} env runners and ray.cpus_per_child={cfg.ray.cpus_per_child:g} "
            f"needs {need_cpu:g}; lower ray.cpus_per_child or search.env_runners"
        )
    if cfg.ray.gpus_per_child > have.get("GPU", 0):
        problems.append(
            f"ray.gpus_per_child={cfg.ray.gpus_per_child:g} but the cluster has "
            f"{have.get('GPU', 0):g} GPUs; set ray.gpus_per_child=0 to train children on CPUs"
        )
    if problems and not ray_address(cfg):
        raise ValueError(problems[0])
    for problem in problems:
        logger.warning("%s (waiting for the cluster to scale up)", problem)
