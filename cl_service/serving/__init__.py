"""Serving: the live engine slot (hot swap) and the micro-batcher."""
