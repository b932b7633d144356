"""knlens: find, test and edit the neurons that carry knowledge in transformer language models."""

__version__ = "0.1.0"
