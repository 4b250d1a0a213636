"""The HTTP surface: the Litestar app, its admin routes and who may use them, the OpenAPI document, /metrics."""
