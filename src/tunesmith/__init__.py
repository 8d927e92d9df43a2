"""tunesmith: fine-tune language models from a raw data file to an evaluated, served model."""

__version__ = "0.1.0"
