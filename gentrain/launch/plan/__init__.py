"""`gentrain plan`: the per-GPU memory plan (footprint of weights, optimizer states, activations)."""
