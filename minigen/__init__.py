"""minigen: generative image models from the ground up.

VAE -> VQ-VAE -> VQGAN (+ transformer prior) -> diffusion -> latent diffusion -> flow
matching, the diffusion transformer and fast samplers, each a module that reads top to
bottom like a chapter.
"""

__version__ = "0.1.0"
