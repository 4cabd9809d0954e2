"""``saferlhf task=serve``: a policy behind an OpenAI-compatible API, optionally guarded by a
moderation model (``engine.py`` the models and batching, ``app.py`` the HTTP routes,
``protocol.py`` the request bodies and errors, ``server.py`` listening and stopping)."""
