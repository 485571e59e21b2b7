"""API keys and their limits: who may call, which models, how much."""
