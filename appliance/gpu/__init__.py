"""The GPUs: what they are, how much memory a replica needs, which GPUs it goes on."""
