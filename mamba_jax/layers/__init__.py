"""Flax NNX layers: Mamba2 mixer, attention, MLP, norms, and the registry of layer symbols."""
