"""pressroom.training."""
