"""`tunesmith serve`: an OpenAI-compatible HTTP server (app.py) over a batching engine (engine.py) that
serves many LoRA adapters on one base model (adapters.py)."""
