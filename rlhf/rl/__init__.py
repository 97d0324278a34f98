"""Step 3: the models it holds, rewards, advantages, the trainer (PPO, GRPO, RLOO, REINFORCE++) and the stage's recipe."""
