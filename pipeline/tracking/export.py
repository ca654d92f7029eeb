"""Portable copies of a student: an MLflow signature for it and an ONNX export checked by onnxruntime.

The ONNX file lets people serve a student without PyTorch; it is only worth shipping if
onnxruntime computes what PyTorch computes, so :func:`export_onnx` measures that on the way out.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4
"""Largest absolute difference between PyTorch and onnxruntime logits accepted as equal."""


@dataclass(frozen=True)
class OnnxExport:
    """Where an ONNX export lies and how closely onnxruntime reproduces PyTorch on it."""

    path: Path
    max_abs_diff: float
    """Largest absolute difference of logits between onnxruntime and PyTorch on the check batch."""

    @property
    def matches(self) -> bool:
        """Whether onnxruntime agrees with PyTorch within :data:`ONNX_TOLERANCE`."""
        return self.max_abs_diff <= ONNX_TOLERANCE


def inference_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode, so exporting never moves or retrains the caller's model."""
    return copy.deepcopy(model).cpu().eval()


def example_batch(
    input_shape: tuple[int, ...] | list[int], batch: int = 4, seed: int = 0
) -> torch.Tensor:
    """A fixed random float32 batch of ``input_shape`` images (batch > 1 keeps the batch axis dynamic)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=generator)


def requirements() -> list[str]:
    """Pinned pip requirements of a logged student (inferring them costs MLflow seconds)."""
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def tensor_signature(model: nn.Module, example: torch.Tensor) -> ModelSignature:
    """The MLflow signature: float32 images ``[-1, C, H, W]`` in, float32 logits ``[-1, K]`` out."""
    with torch.no_grad():
        out = model(example)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]),
    )


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> OnnxExport:
    """Exports ``model`` to ONNX with a dynamic batch axis and compares onnxruntime with PyTorch.

    Args:
        model: the network, in eval mode on the CPU (see :func:`inference_copy`).
        example: a batch of inputs; it traces the graph and is the comparison batch.
        path: the ``.onnx`` file to write.

    Returns:
        The path and the largest absolute difference of the outputs.
    """
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=ONNX_OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # A batch size other than the traced one proves the batch axis really is dynamic.
    check = torch.cat([example, example[:1]])
    got = session.run(None, {"input": check.numpy()})[0]
    with torch.no_grad():
        want = model(check).numpy()
    diff = float(np.abs(got - want).max())
    logger.info("ONNX export %s: max |onnxruntime - torch| = %.2e", path.name, diff)
    return OnnxExport(path=path, max_abs_diff=diff)
