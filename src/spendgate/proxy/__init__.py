"""The HTTP door: an OpenAI- and Anthropic-compatible proxy over the engine."""
