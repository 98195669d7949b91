"""GAN generators and discriminators (nn.Modules only: no losses, no noise schedules).

Generators are diffusers ``ModelMixin`` + ``ConfigMixin`` classes: ``save_pretrained`` writes
config.json + safetensors and ``from_pretrained`` rebuilds them in a fresh process.
"""
