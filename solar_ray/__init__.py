"""solar-ray: depth up-scaling of open LLMs, trained on Ray."""
__version__ = "0.1.0"
