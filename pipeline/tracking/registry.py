"""The final student in MLflow: a PyTorch model in the registry under ``@champion``, plus ONNX.

People take the compressed model from the registry (``models:/NAME@champion``), so the logged
model carries a tensor signature and a dynamic batch axis, its version is tagged with what
someone choosing it needs (compression, size, FLOPs, test accuracy, teacher, dataset), and an
ONNX copy checked against PyTorch with onnxruntime lies in the same run.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric
from torch import nn

from pipeline.tracking import export

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
ONNX_ARTIFACT = "student_onnx/student.onnx"

Call = Callable[[Callable[[], Any], str], Any]
"""Runs an operation with retries: ``call(fn, "what it does")``."""


@dataclass(frozen=True)
class RegisteredStudent:
    """Where the final student went in MLflow."""

    run_id: str
    model_uri: str
    """The logged model, ``models:/m-...``."""
    name: str | None
    """Registered model name; None when no registry name was configured."""
    version: str | None
    onnx_max_abs_diff: float
    """Largest difference between onnxruntime and PyTorch logits on the check batch."""
    onnx_artifact: str = ONNX_ARTIFACT
    """Run-relative path of the ONNX copy."""

    @property
    def champion_uri(self) -> str | None:
        """``models:/NAME@champion``, the URI people load the student from."""
        return f"models:/{self.name}@{CHAMPION_ALIAS}" if self.name else None


def log_student(
    client: mlflow.MlflowClient,
    run_id: str,
    student: nn.Module,
    example_inputs: Any,
    registry_name: str | None,
    call: Call,
) -> tuple[Any, export.OnnxExport]:
    """Logs ``student`` as an MLflow PyTorch model (registered if named) and its ONNX copy.

    Args:
        client: client of the store the run lives in (its registry is the same store).
        run_id: the run to log into.
        student: the network (copied, left untouched).
        example_inputs: a float32 batch ``[N>1, C, H, W]`` for the signature and the ONNX check.
        registry_name: registered model name, or None to log without registering.
        call: runs an MLflow operation with retries.

    Returns:
        MLflow's ``ModelInfo`` and the ONNX export's check.

    Raises:
        ValueError: ``example_inputs`` has fewer than 2 examples.
    """
    model = export.inference_copy(student)
    example = torch.as_tensor(example_inputs, dtype=torch.float32)[:8].cpu()
    if example.ndim < 2 or example.shape[0] < 2:
        raise ValueError(
            f"example_inputs has shape {tuple(example.shape)}; pass a batch of at least 2 "
            "examples so that the logged model keeps a dynamic batch axis"
        )
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export.export_onnx(model, example, Path(tmp) / Path(ONNX_ARTIFACT).name)
        folder = str(Path(ONNX_ARTIFACT).parent)
        call(lambda: client.log_artifact(run_id, str(onnx.path), folder), "log the ONNX copy")
    if not onnx.matches:
        logger.warning(
            "the ONNX copy differs from PyTorch by %.2e (more than %.0e); tagged onnx_matches=false",
            onnx.max_abs_diff, export.ONNX_TOLERANCE,
        )  # fmt: skip
    check = [Metric("onnx/max_abs_diff", onnx.max_abs_diff, 0, 0)]
    call(lambda: client.log_batch(run_id, check), "log the ONNX check")

    def log_model() -> Any:
        # log_model is fluent-only: it logs into the active run of the global tracking URI.
        mlflow.set_tracking_uri(client.tracking_uri)
        mlflow.set_registry_uri(client.tracking_uri)
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            return mlflow.pytorch.log_model(
                model,
                name="student",
                input_example=example.numpy(),
                signature=export.tensor_signature(model, example),
                registered_model_name=registry_name,
                pip_requirements=export.requirements(),
                await_registration_for=60,
            )

    return call(log_model, "log the student model"), onnx


def crown(
    client: mlflow.MlflowClient,
    name: str,
    version: str,
    tags: Mapping[str, Any],
    description: str,
    call: Call,
) -> None:
    """Points ``@champion`` at ``version`` of ``name`` and tags and describes that version.

    Tags whose value is None are left out.
    """
    call(lambda: client.set_registered_model_alias(name, CHAMPION_ALIAS, version), "set @champion")
    for key, value in tags.items():
        if value is not None:
            call(
                lambda k=key, v=str(value): client.set_model_version_tag(name, version, k, v),
                f"tag {name} version {version}",
            )
    call(
        lambda: client.update_model_version(name, version, description=description),
        f"describe {name} version {version}",
    )
    about = (
        f"Students compressed by n2n; @{CHAMPION_ALIAS} is the best student of the latest run. "
        "Each version's tags give its compression ratio, parameters, FLOPs, test accuracy, "
        "teacher and dataset."
    )
    call(lambda: client.update_registered_model(name, description=about), f"describe {name}")
    logger.info("registered %s version %s as @%s", name, version, CHAMPION_ALIAS)
