"""huabi (画笔): a local, offline AI painting studio for the Stable Diffusion family."""

__version__ = "0.1.0"
