"""The typed run configuration: one :class:`RunConfig` of pydantic sections, validated once.

A run is described by one :class:`RunConfig`: pydantic models with ``extra="forbid"``, so an
unknown key, a wrong type or an out-of-range value is rejected naming the dotted key
(``removal.iterations``) before any Ray work starts (``pipeline.config.presets`` loads and
validates it). Every field carries its one-line description, shown by ``n2n`` in errors.

Longer than 400 lines because it is one table: a field per config key with its type, range
and description; split, a section would live apart from the run that holds it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KD_EVALUATOR = "pipeline.children.evaluator:KDEvaluator"
"""The knowledge-distillation evaluator, the default ``search.evaluator``."""
LEGACY_EVALUATORS = {"pipeline.evaluator:KDEvaluator": KD_EVALUATOR}
"""Import paths the evaluator had before the package was laid out in folders: a run directory
from then (its ``config.yaml``) still resumes."""

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """The dataset children are trained and scored on (see ``pipeline.data.datasets.load_dataset``)."""

    name: Literal[
        "digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder", "arrays"
    ] = Field(
        "digits",
        description="Dataset name; arrays is a folder of train/val/test .npz files (the Python "
        "API writes one for data given in memory).",
    )
    root: str | None = Field(
        None, description="Folder holding the dataset; None uses the dataset's default location."
    )
    download: bool = Field(
        False, description="Let torchvision download a missing dataset into root (never implicit)."
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of the training set held out to score rewards."
    )
    max_train: PositiveInt | None = Field(
        None, description="Use at most this many training images (quick runs)."
    )
    max_eval: PositiveInt | None = Field(
        None, description="Use at most this many validation and test images each."
    )
    image_size: PositiveInt = Field(
        32, description="Side length images are resized to (imagefolder only)."
    )
    split_seed: int | None = Field(
        None,
        ge=0,
        description="Seed of the train/validation split; None uses the run's seed. Fix it to "
        "compare seeds of a search on one teacher (whose split it must be).",
    )

    def as_kwargs(self, seed: int) -> dict[str, Any]:
        """Keyword arguments of ``pipeline.data.datasets.load_dataset``."""
        values = self.model_dump(exclude={"split_seed"})
        return {**values, "seed": self.split_seed if self.split_seed is not None else seed}


class TeacherConfig(_Section):
    """The network to compress: an existing checkpoint, or a zoo model trained on the fly."""

    checkpoint: str | None = Field(
        None, description="Teacher checkpoint folder (spec.json + weights.pt); None trains one."
    )
    arch: str = Field(
        "small_cnn",
        description="Zoo name or 'package.module:callable' (e.g. 'torchvision.models:mobilenet_v2') "
        "when training a teacher.",
    )
    width: float = Field(
        1.0,
        gt=0,
        le=4,
        description="Channel width multiplier, for builders taking 'width' (the zoo).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra builder keyword arguments, e.g. {width_mult: 0.25} for mobilenet_v2.",
    )
    epochs: PositiveInt = Field(10, description="Training epochs for a teacher trained on the fly.")
    batch_size: PositiveInt = Field(128, description="Teacher mini-batch size.")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Teacher optimizer.")
    lr: float = Field(
        0.05, gt=0, description="Peak learning rate of the teacher's one-cycle schedule."
    )
    weight_decay: float = Field(5e-4, ge=0, description="Teacher weight decay.")
    augment: Literal["none", "shift", "flip", "shift+flip"] = Field(
        "none", description="Teacher training augmentation, per image (random shifts, flips)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the teacher's cross-entropy."
    )
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")

    @field_validator("kwargs")
    @classmethod
    def _no_width_kwarg(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "width" in kwargs:
            raise ValueError("set teacher.width instead of teacher.kwargs.width")
        return kwargs

    def arch_spec(self) -> dict[str, Any]:
        """The architecture spec: ``kwargs``, and ``width`` for builders that take it (classes
        and channels are filled in from the dataset, see ``pipeline.data.teachers.teacher_base_spec``)."""
        return {"arch": self.arch, "kwargs": dict(self.kwargs), "width": self.width}


class DistillConfig(_Section):
    """Knowledge-distillation budget for each child during the search (``pipeline.children.distill``)."""

    loss: Literal["kd", "l2"] = Field(
        "kd", description="Hinton KD + cross-entropy ('kd') or N2N's L2 on logits ('l2')."
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the KD loss.")
    alpha: float = Field(
        0.9, ge=0, le=1, description="Weight of the KD term against cross-entropy."
    )
    steps: PositiveInt = Field(100, description="Optimizer steps per child.")
    batch_size: PositiveInt = Field(128, description="Child mini-batch size.")
    data_fraction: Fraction = Field(
        1.0, description="Share of the training split a child draws its batches from."
    )
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Child optimizer.")
    lr: float = Field(0.01, gt=0, description="Child learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="Child weight decay.")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")
    timeout_s: float = Field(
        1800.0, gt=0, description="A child training longer fails with reward -1."
    )
    channels_last: bool = Field(
        True,
        description="Channels-last memory format for image batches (faster on CPU and GPU); on "
        "the CPU, children with a strided 1x1 conv of under 16 input channels train in NCHW "
        "(a oneDNN bug).",
    )
    early_stop: bool = Field(
        False,
        description="Stop a child at a checkpoint once a learning-curve bound says it cannot "
        "reach the top-k (finetune.top_k) by reward; its reward is then a lower bound.",
    )
    checkpoints: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.25, 0.5],
        min_length=1,
        description="Fractions of the steps at which early stopping measures accuracy.",
    )
    early_stop_slack: float = Field(
        0.01, ge=0, description="Accuracy added to the early-stop bound, against noise."
    )
    val_subset: PositiveInt | None = Field(
        None,
        description="Score search children on this many validation images (a fixed sample); "
        "None uses all. Fine-tuned students are always scored on all of them.",
    )

    def as_kwargs(self, seed: int, **overrides: Any) -> dict[str, Any]:
        """Fields of ``pipeline.children.distill.DistillConfig``."""
        early = {"early_stop", "checkpoints", "early_stop_slack", "val_subset"}
        values = self.model_dump(exclude={"timeout_s", *early})
        return {**values, "seed": seed, **overrides}

    def early_stop_kwargs(self, top_k: int) -> dict[str, Any] | None:
        """The evaluator's ``early_stop`` settings (``pipeline.children.early_stop.EarlyStop``), or None."""
        if not self.early_stop:
            return None
        return {
            "checkpoints": list(self.checkpoints),
            "top_k": top_k,
            "slack": self.early_stop_slack,
        }


class BudgetConfig(_Section):
    """What a user asks for: the most accurate student within a budget (``n2n run --params``,
    ``--compression``, ``--flops``). With one set, the search aims at it (``reward.name`` auto)
    and the final student is chosen only among students within it, by validation accuracy."""

    params: PositiveInt | None = Field(None, description="Most parameters the student may have.")
    compression: float | None = Field(
        None, gt=1, description="Fewest times fewer parameters than the teacher (10 = teacher/10)."
    )
    flops: float | None = Field(
        None,
        gt=0,
        description="Most FLOPs of one forward pass: a count, or at most 1 for a fraction of the "
        "teacher's.",
    )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.params, self.compression, self.flops))

    def limits(self, teacher_params: int, teacher_flops: int) -> dict[str, int]:
        """The budget as absolute counts, ``{"params": N, "flops": F}`` (the keys set)."""
        out: dict[str, int] = {}
        caps = [self.params] if self.params is not None else []
        if self.compression is not None:
            caps.append(int(teacher_params / self.compression))
        if caps:
            out["params"] = min(caps)
        if self.flops is not None:
            out["flops"] = int(self.flops * teacher_flops if self.flops <= 1 else self.flops)
        return out


class RewardConfig(_Section):
    """How a child's compression and accuracy become a reward (see envs.rewards)."""

    name: Literal["auto", "n2n", "constrained", "budget"] = Field(
        "auto",
        description="N2N's C(2-C)*A/A_teacher, with cost budgets (constrained), or accuracy "
        "within the run's budget (budget); auto is budget when the run has one, else n2n.",
    )
    budgets: dict[Literal["params", "flops", "latency"], Fraction] = Field(
        default_factory=dict,
        description="Constrained reward only: largest fraction of the teacher's cost.",
    )
    softness: float = Field(2.0, gt=0, description="Exponent of the over-budget softening factor.")
    penalty: float = Field(
        0.1, ge=0, description="Budget reward: subtracted from a child over budget."
    )

    def as_env_config(self, limits: dict[str, int], teacher: dict[str, Any]) -> dict[str, Any]:
        """The ``reward`` entry of an env_config, for the budget ``limits`` (absolute counts)
        of a teacher with ``teacher["params"]`` and ``teacher["flops"]``."""
        name = self.name if self.name != "auto" else ("budget" if limits else "n2n")
        if name == "n2n":
            return {"name": "n2n"}
        if name == "constrained":
            return {"name": "constrained", "budgets": dict(self.budgets), "softness": self.softness}
        if not limits:
            raise ValueError(
                "reward.name=budget needs a budget: pass --params N, --compression X or --flops F"
            )
        fractions = {key: min(1.0, n / teacher[key]) for key, n in limits.items()}
        return {"name": "budget", "budgets": fractions, "softness": self.softness,
                "penalty": self.penalty}  # fmt: skip


class SearchConfig(_Section):
    """Settings shared by both RL stages."""

    algo: Literal["ppo", "appo", "random"] = Field(
        "ppo", description="RLlib PPO, RLlib APPO, or the random-search baseline."
    )
    policy: Literal["lstm", "mlp"] = Field(
        "lstm", description="N2N's recurrent policies, or a flat MLP for comparison."
    )
    hidden: PositiveInt = Field(64, description="LSTM cell / MLP layer width of the policy.")
    env_runners: PositiveInt = Field(
        1, description="RLlib env runners = children evaluated at once."
    )
    sample_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest wait for one iteration's rollouts; None sizes it from distill.timeout_s.",
    )
    evaluator: str = Field(KD_EVALUATOR, description="Import path of the child evaluator class.")
    evaluator_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the evaluator (merged over the derived ones).",
    )
    policy_from: str | None = Field(
        None,
        description="Start each stage's policy from the final policy of the same stage of this "
        "earlier run directory (policy transfer, n2n run --policy-from).",
    )
    freeze_policy: bool = Field(
        False, description="With policy_from: evaluate the transferred policy without training it."
    )
    sparsity_steps: int = Field(
        0,
        ge=0,
        description="KD steps with an L1 penalty on the teacher's BatchNorm scales before the "
        "search (Network Slimming's sparsity phase); children are cut from that copy. 0 = off.",
    )
    sparsity_l1: float = Field(
        1e-4, ge=0, description="Coefficient of the sparsity phase's L1 penalty."
    )

    @field_validator("evaluator")
    @classmethod
    def _current_path(cls, path: str) -> str:
        return LEGACY_EVALUATORS.get(path, path)


class StageConfig(_Section):
    """One search stage: how many children it may evaluate and its RL hyperparameters."""

    enabled: bool = Field(
        True, description="Run this stage; a skipped stage passes its input architecture on."
    )
    iterations: PositiveInt = Field(10, description="Training iterations (policy updates).")
    episodes_per_iteration: PositiveInt = Field(
        5, description="Children sampled per update (N2N used 5)."
    )
    lr: float = Field(3e-3, gt=0, description="Policy learning rate.")
    entropy_coeff: float = Field(
        0.01, ge=0, description="Entropy bonus that keeps the policy exploring."
    )
    num_epochs: PositiveInt = Field(4, description="SGD passes over each batch of episodes.")

    @property
    def episodes(self) -> int:
        """Children this stage evaluates in all (cache hits included)."""
        return self.iterations * self.episodes_per_iteration


class RemovalConfig(StageConfig):
    """Stage 1: layer and block removal."""

    fit_budget: bool = Field(
        False,
        description="With a budget (budget.*), shrink each removal child that exceeds it "
        "uniformly (every shrinkable unit to the highest of shrinkage.ratios that fits, with "
        "shrinkage.importance), so removal is scored by the accuracy it leaves at the budget; "
        "stage 2 then starts from the best removal unshrunk. Off, a removal child is scored as "
        "it is (under a tight budget every reward is negative and stage 2 starts from the teacher).",
    )


class ShrinkageConfig(StageConfig):
    """Stage 2: channel shrinkage, with its action set."""

    ratios: list[Fraction] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)],
        description="Keep-ratios a shrinkable unit may take.",
        min_length=2,
    )
    min_channels: PositiveInt = Field(4, description="No layer shrinks below this many channels.")
    importance: Literal["l1", "bn"] = Field(
        "l1", description="Channel importance: filter L1 norm or BatchNorm gamma."
    )
    sequential: bool = Field(
        False, description="One unit per env step (recurrent policy) instead of all at once."
    )
    fit_budget: bool = Field(
        True,
        description="With a budget (budget.*), cap each action's keep-ratios at the highest "
        "common level whose child fits it (AMC's constrained actions), so every child is a "
        "candidate; off, children over the budget are trained and penalised by the reward.",
    )

    @field_validator("ratios")
    @classmethod
    def _sorted_unique(cls, ratios: list[float]) -> list[float]:
        if len(set(ratios)) != len(ratios):
            raise ValueError(f"ratios {ratios} repeat a value")
        return sorted(ratios)


class FinetuneConfig(_Section):
    """The final step: the best distinct students trained longer, then tested once."""

    top_k: PositiveInt = Field(3, description="Distinct students fine-tuned, by search reward.")
    steps: PositiveInt = Field(1000, description="KD optimizer steps per fine-tuned student.")
    lr: float = Field(0.01, gt=0, description="Fine-tuning learning rate.")
    schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="Fine-tuning learning-rate schedule (cosine decays it to zero)."
    )
    warmup: float = Field(
        0.0, ge=0, lt=1, description="Share of the steps with a linear learning-rate warm-up."
    )
    augment: Literal["none", "shift", "flip", "shift+flip"] = Field(
        "none",
        description="Per-image augmentation (random shifts, flips); the teacher then runs on "
        "every batch instead of its cached logits.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the KD loss's cross-entropy term."
    )
    alpha: float | None = Field(
        None, ge=0, le=1, description="KD weight against cross-entropy; None keeps distill.alpha."
    )
    temperature: float | None = Field(
        None, gt=0, description="KD temperature; None keeps distill.temperature."
    )

    def overrides(self) -> dict[str, Any]:
        """The ``KDSettings`` fields fine-tuning sets over ``distill``'s."""
        out: dict[str, Any] = {
            "lr": self.lr, "schedule": self.schedule, "warmup": self.warmup,
            "augment": self.augment, "label_smoothing": self.label_smoothing,
        }  # fmt: skip
        out |= {k: v for k, v in (("alpha", self.alpha), ("temperature", self.temperature))
                if v is not None}  # fmt: skip
        return out


class BaselineConfig(_Section):
    """The classic compressors of ``n2n baseline METHOD`` (see ``pipeline.baselines.run``).

    Every method ends with the fine-tuning budget of ``finetune`` (steps and learning rate),
    with the KD loss of ``distill``, so methods compare at equal training cost.
    """

    amounts: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
        min_length=1,
        description="l1-unstructured: shares of conv/linear weights zeroed, one student each.",
    )
    scope: Literal["global", "layer"] = Field(
        "global", description="l1-unstructured: one global magnitude threshold, or per layer."
    )
    finetune: bool = Field(
        True, description="KD fine-tuning after pruning (finetune.steps); false scores as pruned."
    )
    compression: list[Annotated[float, Field(gt=1)]] = Field(
        default_factory=lambda: [10.0, 20.0],
        description="Parameter budgets as compression factors: teacher params / factor each.",
    )
    params: list[PositiveInt] = Field(
        default_factory=list, description="Parameter budgets as absolute counts (added to those)."
    )
    mode: Literal["uniform", "global"] = Field(
        "global", description="structured-l1: the same ratio for every layer, or a global ranking."
    )
    sparsity_steps: int = Field(
        200, ge=0, description="slimming: KD steps with an L1 penalty on BatchNorm gammas first."
    )
    sparsity_l1: float = Field(
        1e-4, ge=0, description="slimming: coefficient of the L1 penalty on BatchNorm gammas."
    )
    round_factor: Fraction = Field(
        0.5, description="slimming: share of parameters each pruning round keeps, to the budget."
    )
    round_steps: PositiveInt | None = Field(
        None, description="slimming: KD steps after each intermediate round; None = distill.steps."
    )
    student_arch: str = Field(
        "resnet18", description="kd-student: zoo architecture whose width is fitted to the budget."
    )
    register_best: bool = Field(
        False, description="Register the method's best student in the MLflow model registry."
    )

    def targets(self, teacher_params: int) -> list[int]:
        """Parameter budgets, largest first: ``params`` and ``teacher_params / compression``."""
        budgets = {int(p) for p in self.params}
        budgets |= {max(1, int(teacher_params / c)) for c in self.compression}
        return sorted(budgets, reverse=True)


class RayConfig(_Section):
    """Where the search runs."""

    address: str | None = Field(
        None,
        description="Join this Ray cluster ('auto', 'ray://host:10001'); None starts a local one.",
    )
    num_cpus: PositiveInt | None = Field(
        None, description="CPUs of a local cluster; None uses the machine's."
    )
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs of a local cluster; None uses the machine's."
    )
    object_store_mb: PositiveInt = Field(
        1024, description="Object store size of a local cluster, in MiB."
    )
    cpus_per_child: float = Field(
        1.0, gt=0, description="CPUs reserved by each child evaluation task."
    )
    gpus_per_child: float = Field(
        0.0, ge=0, description="GPUs per child task (fractions share one GPU)."
    )


class TrackingConfig(_Section):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log params, metrics and the student model to MLflow.")
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = Field("n2n", min_length=1, description="MLflow experiment name.")
    registry_name: str | None = Field(
        None,
        description="Registered model name of the final student; None means n2n-<config name>.",
    )


class OutputConfig(_Section):
    """Where results go."""

    run_dir: str | None = Field(
        None, description="Run directory; None makes runs/<name>-<timestamp>."
    )
    storage_path: str | None = Field(
        None, description="Ray Tune storage (local path or s3://); None uses <run_dir>/tune."
    )


class SweepConfig(_Section):
    """Several Tune trials over search settings (``n2n sweep``)."""

    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted config key -> values; every combination is one trial.",
    )
    num_samples: PositiveInt = Field(1, description="Repeats of the grid (with different seeds).")
    scheduler: Literal["none", "asha"] = Field(
        "asha", description="Stop weak trials early with ASHA, or run all to the end."
    )
    grace_period: PositiveInt = Field(
        2, description="ASHA: iterations before a trial may be stopped."
    )
    max_concurrent: PositiveInt = Field(1, description="Trials at once.")

    @field_validator("grid")
    @classmethod
    def _non_empty_lists(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return grid


class RunConfig(_Section):
    """A whole run: data, teacher, child budget, reward, both search stages, outputs."""

    name: str = Field(
        "demo", min_length=1, description="Run name, used in the run directory and MLflow."
    )
    seed: int = Field(0, ge=0, description="Seed of everything (data split, policies, children).")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    removal: RemovalConfig = Field(default_factory=RemovalConfig)
    shrinkage: ShrinkageConfig = Field(default_factory=ShrinkageConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if not (self.removal.enabled or self.shrinkage.enabled):
            raise ValueError(
                "removal.enabled and shrinkage.enabled are both false: enable at least one stage"
            )
        runners = self.search.env_runners
        for name in ("removal", "shrinkage"):
            episodes = self.stage(name).episodes_per_iteration
            if self.search.algo == "ppo" and runners > 1 and episodes % runners:
                raise ValueError(
                    f"{name}.episodes_per_iteration={episodes} is not a multiple of "
                    f"search.env_runners={runners}: PPO splits each batch evenly between env "
                    "runners; change one of them"
                )
        if self.search.freeze_policy and self.search.policy_from is None:
            raise ValueError(
                "search.freeze_policy needs search.policy_from (--policy-from RUN_DIR): there is "
                "no policy to evaluate"
            )
        timeout = self.search.sample_timeout_s
        if timeout is not None and timeout < self.distill.timeout_s:
            raise ValueError(
                f"search.sample_timeout_s={timeout:g} is shorter than distill.timeout_s="
                f"{self.distill.timeout_s:g}: RLlib would drop episodes of slow children; raise it "
                "or leave it unset"
            )
        return self

    def rollout_timeout_s(self, stage: str) -> float:
        """RLlib's ``sample_timeout_s`` for a stage: ``search.sample_timeout_s``, or long enough
        for every child an env runner evaluates in one iteration to use its whole timeout."""
        if self.search.sample_timeout_s is not None:
            return self.search.sample_timeout_s
        per_runner = math.ceil(self.stage(stage).episodes_per_iteration / self.search.env_runners)
        return per_runner * (2 * self.distill.timeout_s + 60)

    def stage(self, name: str) -> StageConfig:
        """The ``removal`` or ``shrinkage`` section."""
        return {"removal": self.removal, "shrinkage": self.shrinkage}[name]

    def resolve_paths(self, now: float | None = None) -> RunConfig:
        """A copy with ``output.run_dir`` and ``output.storage_path`` made absolute."""
        out = self.model_copy(deep=True)
        if out.output.run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
            out.output.run_dir = str(Path("runs") / f"{out.name}-{stamp}")
        run_dir = Path(out.output.run_dir).expanduser().resolve()
        out.output.run_dir = str(run_dir)
        if out.search.policy_from is not None:
            out.search.policy_from = str(Path(out.search.policy_from).expanduser().resolve())
        if out.output.storage_path is None:
            out.output.storage_path = str(run_dir / "tune")
        elif "://" not in out.output.storage_path:
            out.output.storage_path = str(Path(out.output.storage_path).expanduser().resolve())
        return out

    def to_yaml(self) -> str:
        """The config as YAML, reloadable with :func:`load_config`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
