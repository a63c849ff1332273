"""Model calls: the client port, retry and prices, the Anthropic adapter and the offline model."""
