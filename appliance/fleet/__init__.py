"""The engine replicas: how many each model has, each one's lifecycle, where a request goes among them."""
