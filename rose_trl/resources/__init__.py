"""What a run needs from the machine: each pass's memory estimated from the model's shape (`memory`), the budget
that sizes every pass to it (`budget`), and free disk checked before work (`disk`)."""
