"""lmsmith: make language models smaller, fairer and better grounded."""

__version__ = "0.1.0"
