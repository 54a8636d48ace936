"""pressroom.kernels."""
