"""``qwenvl serve``: an OpenAI-compatible HTTP server for Qwen-VL.

``engine`` (continuous batching over decode slots), ``app`` (FastAPI routes), ``protocol`` (the wire format),
``media`` (image URLs and their limits), ``metrics`` (Prometheus text), ``cli`` (the subcommand),
``static/index.html`` (the chat page). FastAPI and uvicorn are needed only here: ``pip install qwenvl[serve]``.
"""
