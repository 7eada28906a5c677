"""What every trainer shares: processes, precision and seeds, the DeepSpeed engine with AdamW and its
schedule, config sections, loaders, non-finite checks, checkpoints and logging."""
