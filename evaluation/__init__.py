"""pressroom.evaluation."""
