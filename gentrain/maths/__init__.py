"""Small pure objects, tested alone: samplers, GAN losses, batch RNG, bottleneck statistics."""
