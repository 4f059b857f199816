"""Black-box HTTP load generator for OpenAI-compatible servers; imports nothing from loramux."""

__version__ = "0.1.0"
