"""The lifecycle every trainer shares: DeepSpeed runtime, checkpoints, the fit loop, losses, metrics; and SFT."""
