"""Gradient stores: the memory-mapped store itself (`store`), the pool's training gradients (`extraction`) and the
preference pairs' validation gradients through TRL's DPO loss (`validation`)."""
