"""Sources -> rows -> splits: reading, normalising, validating, splitting and tokenising data, and the shipped task."""
