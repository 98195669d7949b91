"""Small pure objects, tested alone: the linear path (paths), the VP schedule
(schedules), samplers, GAN losses, the batch RNG (rng), bottleneck statistics."""
