"""Supervised fine-tuning: the config and the step. ``train/sft.py`` is the recipe."""
