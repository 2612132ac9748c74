"""Client side: local training, evaluation and the Flower ClientApp."""
