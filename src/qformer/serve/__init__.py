"""``qformer serve``: an HTTP API and a web page for a BLIP-2 model (FastAPI on uvicorn)."""
