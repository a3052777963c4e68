"""`libortho serve`: an OpenAI-compatible HTTP server for one libortho artifact, where each API
key's privilege sets the highest alpha it may use, and requests of different alphas share a batch.

Modules (each one concept):
  keys      KEYS.json: SHA-256-hashed API keys with max_alpha / default_alpha
  gate      which alpha a request is served at (401 / 403 / 400 rules)
  schema    the OpenAI request bodies: supported, accepted-and-ignored, unknown (400)
  sampling  per-row greedy / temperature / top-p sampling with per-row generators
  text      incremental detokenization and stop strings
  kvbatch   a left-padded batch of rows with one KV cache, joinable at step boundaries
  engine    the single worker thread: dynamic + continuous batching, one alpha per row
  metrics   Prometheus text exposition by alpha
  app       the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
  server    loading an artifact for serving; uvicorn with a graceful drain on SIGTERM
  commands  the `serve` and `keys` subcommands

Importing this package imports nothing heavy; torch and FastAPI load with the submodules.
"""
