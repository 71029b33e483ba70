"""Flower apps: the coordinator's ServerApp and each site's ClientApp."""
