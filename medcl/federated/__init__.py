"""Federated continual learning across hospitals, on Flower."""
