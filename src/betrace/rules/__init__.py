"""Rules: the model, loading per tenant, and the engine that compiles them."""
