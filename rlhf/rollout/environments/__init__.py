"""Environments of multi-turn rollouts (ppo.environment): the interface, tool calls, and the shipped calculator."""

from rlhf.rollout.environments.base import Environment, Step, ToolEnvironment

__all__ = ["Environment", "Step", "ToolEnvironment"]
