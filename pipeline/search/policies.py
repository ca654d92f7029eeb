"""N2N's policies as RLlib (new API stack) ``TorchRLModule``s.

The observation of both environments is the teacher's unit descriptors, a float32
``Box(units, features)``; the action addresses a subset of the units (the removable ones for
stage 1, the shrinkable ones for stage 2), given by ``model_config["action_units"]`` (unit
indices) or found from a 0/1 descriptor column ``model_config["mask_column"]``.

- :class:`UnitLSTMModule` (``autoregressive=False``): N2N's removal policy. A bidirectional
  LSTM reads the units in network order and each addressed unit gets its own logits
  (``MultiDiscrete([k] * n)``: one keep/remove pair per removable unit).
- :class:`UnitLSTMModule` (``autoregressive=True``): N2N's shrinkage policy for the
  all-at-once env mode. A second, unidirectional LSTM walks the addressed units and feeds each
  unit's sampled ratio into the next step, so every choice is conditioned on the ones before
  it. Training re-scores the stored actions by teacher forcing, which gives the exact
  log-probability of the joint action.
- :class:`StepLSTMModule`: the shrinkage policy for the sequential env mode (one unit per
  step, ``Discrete(k)``): the descriptors are encoded each step and an LSTM over steps carries
  the earlier choices in its state, as in RLlib's ``LSTMContainingRLModule`` example.

All implement ``ValueFunctionAPI`` (PPO, APPO) and ``TargetNetworkAPI`` (APPO). The MLP
option is RLlib's default module behind a ``FlattenObservations`` connector (see
:func:`module_spec`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import (
    TorchCategorical,
    TorchMultiCategorical,
)
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import TARGET_NETWORK_ACTION_DIST_INPUTS, TargetNetworkAPI
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

POLICIES = ("lstm", "mlp")


def _unit_space_check(observation_space: gym.Space, name: str) -> tuple[int, int]:
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 2):
        raise ValueError(
            f"{name} needs a Box observation of shape [units, features], got {observation_space}; "
            "use policy 'mlp' for other observations"
        )
    return int(observation_space.shape[0]), int(observation_space.shape[1])


def _action_units(
    model_config: dict[str, Any], units: int, n_actions: int
) -> list[int] | int | None:
    """Unit indices the action addresses, a mask column to find them, or None for all units."""
    if model_config.get("action_units") is not None:
        idx = [int(i) for i in model_config["action_units"]]
        if len(idx) != n_actions or any(not 0 <= i < units for i in idx):
            raise ValueError(
                f"model_config['action_units'] {idx} must list {n_actions} unit indices in [0, {units})"
            )
        return idx
    if model_config.get("mask_column") is not None:
        return int(model_config["mask_column"])
    if n_actions == units:
        return None
    raise ValueError(
        f"the action addresses {n_actions} of {units} units: pass model_config['action_units'] "
        "(their indices) or model_config['mask_column'] (a 0/1 descriptor column)"
    )


class _UnitEncoder(nn.Module):
    """Descriptor rows -> per-unit features from a bidirectional LSTM over the units."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(obs))
        return out


class _UnitPolicyNet(nn.Module):
    """Encoder + per-unit heads; with ``autoregressive`` a decoder LSTM chains the choices."""

    def __init__(self, features: int, hidden: int, choices: int, autoregressive: bool) -> None:
        super().__init__()
        self.encoder = _UnitEncoder(features, hidden)
        self.choices = choices
        self.autoregressive = autoregressive
        if autoregressive:
            # Input: the unit's encoding and the previous unit's choice (one-hot; zeros first).
            self.decoder = nn.LSTMCell(self.encoder.out_dim + choices, hidden)
            self.head = nn.Linear(hidden, choices)
        else:
            self.head = nn.Linear(self.encoder.out_dim, choices)
        # Small initial logits: the first policy is close to uniform, as a search should start.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def logits(self, enc: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        """Per-unit logits ``[B, n, k]``; autoregressive nets condition on ``actions``."""
        if not self.autoregressive:
            return self.head(enc)
        if actions is None:
            raise ValueError("an autoregressive policy needs the actions to score")
        prev = torch.zeros(enc.shape[0], enc.shape[1], self.choices, device=enc.device)
        prev[:, 1:] = nn.functional.one_hot(actions[:, :-1].long(), self.choices).float()
        return self._decode(enc, prev_onehots=prev)

    def sample(self, enc: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples (or takes the mode of) one choice per unit: ``(actions [B, n], logits [B, n, k])``."""
        if not self.autoregressive:
            logits = self.head(enc)
            dist = torch.distributions.Categorical(logits=logits)
            return (logits.argmax(-1) if greedy else dist.sample()), logits
        return self._decode(enc, greedy=greedy)

    def _decode(
        self, enc: torch.Tensor, prev_onehots: torch.Tensor | None = None, greedy: bool = False
    ):  # noqa: ANN202
        batch, units, _ = enc.shape
        h = enc.new_zeros(batch, self.decoder.hidden_size)
        c = enc.new_zeros(batch, self.decoder.hidden_size)
        prev = enc.new_zeros(batch, self.choices)
        all_logits, actions = [], []
        for i in range(units):
            if prev_onehots is not None:
                prev = prev_onehots[:, i]
            h, c = self.decoder(torch.cat([enc[:, i], prev], dim=-1), (h, c))
            logits = self.head(h)
            all_logits.append(logits)
            if prev_onehots is None:
                a = (
                    logits.argmax(-1)
                    if greedy
                    else torch.distributions.Categorical(logits=logits).sample()
                )
                actions.append(a)
                prev = nn.functional.one_hot(a, self.choices).float()
        logits = torch.stack(all_logits, dim=1)
        if prev_onehots is not None:
            return logits
        return torch.stack(actions, dim=1), logits


class _PolicyTargetNetwork(TargetNetworkAPI):
    """APPO's target network: a frozen copy of the module's policy net ``self._pi``."""

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self._old_pi = make_target_network(self._pi)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self._pi, self._old_pi)]


class UnitLSTMModule(TorchRLModule, ValueFunctionAPI, _PolicyTargetNetwork):
    """N2N's unit-wise policy for a ``MultiDiscrete([k] * n)`` action over addressed units.

    ``model_config``: ``hidden`` (LSTM size, default 64), ``autoregressive`` (default False),
    ``action_units`` or ``mask_column`` (which units the action addresses).
    """

    @override(TorchRLModule)
    def setup(self) -> None:
        units, features = _unit_space_check(self.observation_space, type(self).__name__)
        if (
            not isinstance(self.action_space, gym.spaces.MultiDiscrete)
            or len(set(self.action_space.nvec)) != 1
        ):
            raise ValueError(
                f"{type(self).__name__} needs a MultiDiscrete action with the same number of "
                f"choices per unit, got {self.action_space}"
            )
        self._n = len(self.action_space.nvec)
        self._k = int(self.action_space.nvec[0])
        self._units = _action_units(self.model_config, units, self._n)
        hidden = int(self.model_config.get("hidden", 64))
        self._pi = _UnitPolicyNet(
            features, hidden, self._k, bool(self.model_config.get("autoregressive", False))
        )
        # The value net has its own encoder: with one-step episodes it learns a baseline, and
        # its (large) loss gradients would otherwise swamp the policy's shared features.
        self._vf_encoder = _UnitEncoder(features, hidden)
        self._vf = nn.Sequential(
            nn.Linear(2 * self._vf_encoder.out_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )
        self.action_dist_cls = TorchMultiCategorical.get_partial_dist_cls(
            space=self.action_space, input_lens=[self._k] * self._n
        )

    @property
    def autoregressive(self) -> bool:
        return self._pi.autoregressive

    def _select(self, enc: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """The encodings of the addressed units, ``[B, n, 2h]``."""
        if self._units is None:
            return enc
        if isinstance(self._units, list):
            return enc[:, self._units]
        mask = obs[..., self._units] > 0.5
        if not bool((mask == mask[:1]).all()) or int(mask[0].sum()) != self._n:
            raise ValueError(
                f"descriptor column {self._units} marks {mask.sum(-1).tolist()} units per "
                f"observation, but the action addresses {self._n}"
            )
        return enc[:, mask[0]]

    def _values(self, enc: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([enc.mean(dim=1), enc.max(dim=1).values], dim=-1)
        return self._vf(pooled).squeeze(-1)

    def _act(self, batch: dict[str, Any], greedy: bool) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        enc = self._pi.encoder(obs)
        actions, logits = self._pi.sample(self._select(enc, obs), greedy=greedy)
        flat = logits.reshape(logits.shape[0], -1)
        out = {Columns.ACTION_DIST_INPUTS: flat}
        if self.autoregressive:
            # RLlib's GetActions connector would sample each unit independently from the
            # logits; an autoregressive policy has already sampled them in order.
            out[Columns.ACTIONS] = actions
            out[Columns.ACTION_LOGP] = self.action_dist_cls.from_logits(flat).logp(actions)
        return out

    @override(TorchRLModule)
    def _forward_inference(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._act(batch, greedy=True)

    @override(TorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._act(batch, greedy=False)

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._score(self._pi, batch)

    def _score(self, net: _UnitPolicyNet, batch: dict[str, Any]) -> dict[str, Any]:
        """Logits of the stored actions (teacher forcing for an autoregressive net)."""
        obs = batch[Columns.OBS]
        enc = net.encoder(obs)
        actions = batch.get(Columns.ACTIONS) if net.autoregressive else None
        logits = net.logits(self._select(enc, obs), actions)
        return {Columns.ACTION_DIST_INPUTS: logits.reshape(logits.shape[0], -1)}

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        return self._values(self._vf_encoder(batch[Columns.OBS]))

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self._score(self._old_pi, batch)
        return {TARGET_NETWORK_ACTION_DIST_INPUTS: out[Columns.ACTION_DIST_INPUTS]}


class _StepNet(nn.Module):
    """Per-step descriptor encoding (pooled BiLSTM over units) -> LSTM over steps -> logits."""

    def __init__(self, features: int, hidden: int, choices: int) -> None:
        super().__init__()
        self.encoder = _UnitEncoder(features, hidden)
        self.cell = nn.LSTM(2 * self.encoder.out_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, choices)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, obs: torch.Tensor, state: dict[str, torch.Tensor]):  # noqa: ANN201
        batch, steps, units, features = obs.shape
        enc = self.encoder(obs.reshape(batch * steps, units, features))
        pooled = torch.cat([enc.mean(dim=1), enc.max(dim=1).values], dim=-1).reshape(
            batch, steps, -1
        )
        out, (h, c) = self.cell(pooled, (state["h"].unsqueeze(0), state["c"].unsqueeze(0)))
        return out, self.head(out), {"h": h.squeeze(0), "c": c.squeeze(0)}


class StepLSTMModule(TorchRLModule, ValueFunctionAPI, _PolicyTargetNetwork):
    """Recurrent policy over env steps for the sequential shrinkage mode (``Discrete(k)``).

    The env marks the unit being decided in its ``cursor`` column and writes earlier choices
    into ``keep_ratio``; the LSTM state carries them too, as N2N's shrinkage LSTM does.
    ``model_config``: ``hidden`` (default 64), ``max_seq_len`` (RLlib's, default 64).
    """

    @override(TorchRLModule)
    def setup(self) -> None:
        _, features = _unit_space_check(self.observation_space, type(self).__name__)
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(
                f"{type(self).__name__} needs a Discrete action, got {self.action_space}"
            )
        self._hidden = int(self.model_config.get("hidden", 64))
        self._pi = _StepNet(features, self._hidden, int(self.action_space.n))
        self._vf = nn.Linear(self._hidden, 1)
        self.action_dist_cls = TorchCategorical

    @override(TorchRLModule)
    def get_initial_state(self) -> dict[str, np.ndarray]:
        return {"h": np.zeros(self._hidden, np.float32), "c": np.zeros(self._hidden, np.float32)}

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        _, logits, state = self._pi(batch[Columns.OBS], batch[Columns.STATE_IN])
        return {Columns.ACTION_DIST_INPUTS: logits, Columns.STATE_OUT: state}

    @override(TorchRLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        emb, logits, state = self._pi(batch[Columns.OBS], batch[Columns.STATE_IN])
        return {
            Columns.ACTION_DIST_INPUTS: logits,
            Columns.STATE_OUT: state,
            Columns.EMBEDDINGS: emb,
        }

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            embeddings, _, _ = self._pi(batch[Columns.OBS], batch[Columns.STATE_IN])
        return self._vf(embeddings).squeeze(-1)

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        _, logits, _ = self._old_pi(batch[Columns.OBS], batch[Columns.STATE_IN])
        return {TARGET_NETWORK_ACTION_DIST_INPUTS: logits}


def module_spec(
    policy: str,
    action_space: gym.Space,
    hidden: int = 64,
    action_units: list[int] | None = None,
    mask_column: int | None = None,
    autoregressive: bool = False,
) -> tuple[RLModuleSpec, Any]:
    """The RLModule spec and env-to-module connector (or None) for a policy name.

    ``"lstm"`` picks :class:`UnitLSTMModule` for a ``MultiDiscrete`` action (autoregressive
    when asked) and :class:`StepLSTMModule` for a sequential ``Discrete`` one; ``"mlp"`` is
    RLlib's default module on flattened observations.
    """
    if policy == "mlp":
        from ray.rllib.connectors.env_to_module import FlattenObservations

        spec = RLModuleSpec(
            model_config={"fcnet_hiddens": [hidden, hidden], "fcnet_activation": "tanh"}
        )
        return spec, (lambda env=None, spaces=None, device=None: FlattenObservations())
    if policy != "lstm":
        raise ValueError(f"unknown policy {policy!r}: use one of {list(POLICIES)}")
    if isinstance(action_space, gym.spaces.Discrete):
        return RLModuleSpec(
            module_class=StepLSTMModule, model_config={"hidden": hidden, "max_seq_len": 64}
        ), None
    config = {
        "hidden": hidden,
        "autoregressive": autoregressive,
        "action_units": action_units,
        "mask_column": mask_column,
    }
    return RLModuleSpec(module_class=UnitLSTMModule, model_config=config), None
