"""Generative families behind one protocol (see base.py)."""
