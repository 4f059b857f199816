"""loramux server: CLI, HTTP API, engine, runner and models."""
