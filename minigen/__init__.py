"""minigen: generative image models from the ground up.

VAE -> VQ-VAE -> VQGAN (+ transformer prior) -> diffusion -> latent diffusion,
each a module that reads top to bottom like a chapter.
"""

__version__ = "0.1.0"
