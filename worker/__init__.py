"""The GPU side: model loading, batched inference, the worker service and its CLI."""
