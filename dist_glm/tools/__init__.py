"""The commands that use a trained result: evaluate, chat, export, serve (+ `serving/`), and the two
distillation helpers that run a teacher ahead of training (`distill_cache`, `distill_generate`)."""
