"""Serving: `engine` (continuous batching over decode slots), `api` (the OpenAI-compatible HTTP
server of --mode=serve) and `page.html` (its playground)."""
