"""PPO's learner with the two health figures RLlib does not report: approximate KL and the
clip fraction, computed as CleanRL does, beside RLlib's own entropy and value-function
explained variance (all logged to MLflow per iteration, see ``pipeline.tracking.progress``).

With the KL penalty off (n2n's PPO clips only), RLlib's ``mean_kl_loss`` is a constant 0, so
a policy that collapses or stops moving would not show; these two do.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

APPROX_KL, CLIP_FRACTION = "approx_kl", "clip_fraction"


class DiagnosedPPOLearner(PPOTorchLearner):
    """:class:`PPOTorchLearner` that also logs ``approx_kl`` and ``clip_fraction``."""

    @override(PPOTorchLearner)
    def compute_loss_for_module(
        self, *, module_id: str, config: Any, batch: dict[str, Any], fwd_out: dict[str, Any]
    ) -> torch.Tensor:
        loss = super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )
        with torch.no_grad():
            module = self.module[module_id].unwrapped()
            dist = module.get_train_action_dist_cls().from_logits(
                fwd_out[Columns.ACTION_DIST_INPUTS]
            )
            log_ratio = dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP]
            ratio = log_ratio.exp()
            approx_kl = (ratio - 1) - log_ratio  # CleanRL's low-variance estimator
            clipped = ((ratio - 1).abs() > config.clip_param).float()
            if Columns.LOSS_MASK in batch:
                mask = batch[Columns.LOSS_MASK]
                approx_kl, clipped = approx_kl[mask], clipped[mask]
            self.metrics.log_dict(
                {APPROX_KL: approx_kl.mean(), CLIP_FRACTION: clipped.mean()},
                key=module_id,
                window=1,
            )
        return loss
