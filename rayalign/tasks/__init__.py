"""Embedded tasks with programmatic gold rewards (no downloads): text in, scores out."""
