"""Conventions every stage shares: atomic file writes and checkpoint names, a model's mode and id, and the
helpers for parameters sharded by DeepSpeed ZeRO or FSDP2."""
