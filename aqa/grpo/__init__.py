"""GRPO: config, policy/reference, rollouts and the step. ``train/grpo.py`` is the recipe."""
