"""`libortho serve`: an OpenAI-compatible HTTP server for one libortho artifact, where each API
key's privilege sets the highest alpha it may use, and requests of different alphas share a batch.

Modules (each one concept):
  config         ServeConfig: every server setting and its default
  keys           KEYS.json: SHA-256-hashed API keys with max_alpha / default_alpha; add, list, revoke, set
  keywatch       KEYS.json changes picked up while the server runs (polled, and on SIGHUP)
  gate           who is calling (401), and which alpha a request is served at (400 / 403)
  schema         the OpenAI request bodies: supported, accepted-and-ignored, unknown (400); body limits
  prompts        the prompt as token ids (completion text, chat template), refused early when too long
  sampling       per-row greedy / temperature / top-p sampling on the logits' device, per-row generators
  text           incremental detokenization and stop strings
  slot_cache     a preallocated KV cache of fixed slots, one per running request
  llama_step     the Llama-architecture decoder forward against the slot cache (prefill and decode)
  decode_graphs  decode steps and prefill chunks captured in CUDA graphs, one per (rows, tokens, width) bucket
  slot_runner    chunked prefill and decode steps on the slot cache (Llama-architecture models)
  kvbatch        a left-padded batch of rows with one KV cache (other models), and its runner
  engine         the single worker thread: dynamic + continuous batching, one alpha per row
  engine_stats   where the engine's time goes: seconds per phase, graph replays, eager steps, captures
  metrics        Prometheus text exposition by alpha
  state          ServerState: what the handlers share (engine, gate, config, draining, in flight)
  errors         errors in OpenAI's shape
  responses      OpenAI's response bodies and server-sent events
  generation     one generation request, from HTTP to the engine (checks in order) and back
  gateway        gateway mode: the same checks, then the request forwarded to an upstream engine (alpha 0 / 1)
  streaming      a request's events collected or streamed, and how it ended
  routes_openai  /v1/completions, /v1/chat/completions, /v1/models
  routes_ops     /health, /metrics
  app            the FastAPI app: the routers, the error handlers, the engine's lifespan
  server         loading an artifact for serving; uvicorn with a graceful drain on SIGTERM
  commands       the `serve` and `keys` subcommands

Importing this package imports nothing heavy; torch and FastAPI load with the submodules.
"""
