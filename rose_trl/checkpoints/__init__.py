"""A finished warm-up's checkpoint folders read back: DeepSpeed ZeRO (`zero`) and FSDP2 (`fsdp`) optimizer
states, and each checkpoint's learning rate rebuilt from its schedule (`schedules`)."""
