"""aqa: fine-tune audio-language models for multiple-choice audio question answering."""

__version__ = "0.1.0"
