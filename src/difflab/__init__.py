"""difflab: diffusion models that are correct to the math."""
