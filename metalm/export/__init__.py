"""Exports of checkpoints to other ecosystems' formats (read through metalm.checkpoint, never train/)."""
