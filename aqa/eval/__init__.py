"""Evaluation: prediction over a split, option orders, metrics, training-time dev accuracy."""
