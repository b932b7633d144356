"""knlens."""
