"""Real datasets (in progress)."""
