"""Rollout engines: prompts in, answers (token ids, masks, log-probs) out. Our decode loop and transformers' generate."""
