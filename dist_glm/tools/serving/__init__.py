"""The OpenAI-compatible server: `engine` (batched generation on one worker thread) and `api` (FastAPI
routes, auth, errors). `dist_glm.tools.serve` is its command line."""
