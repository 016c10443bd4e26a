"""Merge strategies (weights), the plan of the output, and the streaming engine that executes it."""
