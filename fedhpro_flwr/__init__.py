"""fedhpro-flwr: FedHPro and its peers as a Flower federated application."""

__version__ = "0.1.0"
