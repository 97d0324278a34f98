"""Step 2 and its alternative: the reward model on preference pairs, and DPO straight from the pairs."""
