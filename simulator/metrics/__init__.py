"""Metrics computed once per generation; see registry.py."""
