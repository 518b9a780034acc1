"""Reference simulator for self-consuming generative training."""

__version__ = "0.1.0"
