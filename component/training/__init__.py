"""Training: arguments, data, the Trainer, its callbacks, and one run from start to saved model."""
