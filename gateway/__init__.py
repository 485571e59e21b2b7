"""llm-gateway: an OpenAI-compatible LLM gateway on Ray Serve."""
