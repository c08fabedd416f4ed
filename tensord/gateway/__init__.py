"""The token gateway: OpenAI- and Ollama-compatible streaming from the cluster's Ollama nodes."""
