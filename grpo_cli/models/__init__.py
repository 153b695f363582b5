"""Models: the embedded tiny LM, loading any causal LM, LoRA, and per-token log-probs."""
