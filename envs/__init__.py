"""N2N environments, model description and surgery. Never imports ``pipeline``."""

from envs.checkpoint import build_from_spec, load_checkpoint, load_network, save_checkpoint
from envs.env import RemovalEnv, ShrinkageEnv, register
from envs.evaluation import Child, ChildResult, Evaluator, SyntheticEvaluator, load_evaluator
from envs.spec import arch_hash
from envs.surgery import analyze, make_child

__all__ = [
    "Child", "ChildResult", "Evaluator", "RemovalEnv", "ShrinkageEnv", "SyntheticEvaluator",
    "analyze", "arch_hash", "build_from_spec", "load_checkpoint", "load_evaluator", "load_network",
    "make_child", "register", "save_checkpoint",
]  # fmt: skip
