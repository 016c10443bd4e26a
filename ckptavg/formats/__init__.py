"""Lazy readers for checkpoint files and the streaming safetensors writer."""
