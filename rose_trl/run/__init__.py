"""A run, on top of every stage: the ledger of its checkpoints and learning rates (`ledger`), the coordinator
(`selector`), and its three entry points: the callback (`callback`), a finished warm-up's folders (`offline`) and
the recipes' job (`pipeline`)."""
