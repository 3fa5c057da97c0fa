"""The MLX backend (mlx + mlx-lm) for Apple Silicon: built in the next milestone."""
