"""`duospec serve`: the OpenAI API over HTTP in front of one loaded Pipeline.

errors.py (OpenAI-style error objects), schema.py (request bodies -> GenerationSpec), stops.py (stop
sequences over streamed text), scheduler.py (the bounded queue and the one generating thread),
metrics.py (Prometheus), app.py (FastAPI routes, SSE), run.py (the CLI command, uvicorn, signals).
FastAPI, uvicorn and prometheus-client come with `pip install 'duospec[serve]'`; nothing here is
imported by the rest of duospec.
"""
