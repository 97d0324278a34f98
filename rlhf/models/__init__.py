"""Building, loading and describing models: architectures, tokenizers and chat templates, log-probs, cards."""
