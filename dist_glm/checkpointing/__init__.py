"""Training checkpoints: writing, sealing, pruning and resuming them (`checkpoints`), the loop's own
state saved with them (`trainer_state`), reading their weights back without a process group
(`weights`), and refusing pickles that could run code (`safe_load`)."""
