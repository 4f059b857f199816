"""Model definitions, weight loading, tokenizer, embedded demo model."""
