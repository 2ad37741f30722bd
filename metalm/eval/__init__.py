"""Checkpoint evaluation: effective rank, attention entropy, validation loss, NER fine-tuning, the watcher
that runs them asynchronously on every checkpoint, and the run report."""
