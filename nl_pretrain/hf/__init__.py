"""Hugging Face export of nl-pretrain models (``nl-pretrain export --format hf``)."""
