"""HTTP API: FastAPI app factory, OpenAI-style routes, schemas."""
