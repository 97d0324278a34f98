"""The adaptive KL controller (Ziegler et al. 2019): the KL coefficient that keeps the policy near a target KL."""

from __future__ import annotations

from typing import Any


class AdaptiveKLController:
    """The KL coefficient beta, adapted towards a target KL (Ziegler et al. 2019, section 2.2), or fixed.

        e_t    = clip(KL_t / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e_t * n_steps / horizon)

    target None keeps beta fixed at init_kl_coef (what DeepSpeed-Chat does).
    """

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int) -> None:
        if target is not None and target <= 0:
            raise ValueError(f"KL target must be > 0 (or None for a fixed coefficient), got {target}")
        if target is not None and horizon <= 0:
            raise ValueError(f"KL horizon must be > 0 when a KL target is set, got {horizon}")
        self.value: float = float(init_kl_coef)  # beta, read by kl_shaped_rewards
        self.target = target  # nats per sequence the controller steers towards; None: fixed
        self.horizon = horizon  # samples over which a full proportional error is applied

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta after a batch whose mean KL was current_kl; n_steps = samples in that batch."""
        if self.target is None:
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """The adapted coefficient plus the settings it was adapted under (for the checkpoint's record)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the adapted coefficient. target and horizon stay those given to __init__ (params.yaml is
        their single source), so a resumed run follows the current config."""
        self.value = float(state["value"])
