"""Floor 5, serving: the OpenAI-compatible HTTP shell around the engine, its metrics and the Ray Serve
deployment (needs the serve / ray extras)."""
