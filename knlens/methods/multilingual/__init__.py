"""One fact in many languages: which facts a model knows in each, their language-independent and
language-specific neurons (docs/methods.md, multilingual neurons)."""
