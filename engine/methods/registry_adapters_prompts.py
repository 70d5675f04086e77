"""Registers the bottleneck-adapter and prompt methods."""
