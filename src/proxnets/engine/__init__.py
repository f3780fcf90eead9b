"""The shared training engine (in progress)."""
