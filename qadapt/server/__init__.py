"""HTTP serving: OpenAI- and LoRAX-compatible endpoints with per-request adapters batched together.

``app.py`` (routes), ``schemas.py`` (request bodies), ``registry.py`` (adapter
names, versions, limits), ``scheduler.py`` (the continuous-batching engine).
Needs the ``serve`` extra (starlette, uvicorn).
"""
