"""Models: loading a base model and its tokenizer for training (`loading`), and what a path names and how
to load a trained result of any kind for the tools, the teacher and continued training (`artifacts`).
A GLM family with quirks of its own gets one module here."""
