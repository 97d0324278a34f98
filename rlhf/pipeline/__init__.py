"""What makes every stage a good DVC citizen: atomic output folders, manifests, the check stage, the summary."""
