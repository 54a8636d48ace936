"""pressroom.presses."""
