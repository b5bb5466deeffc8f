"""diffem: learn diffusion-model priors from corrupted observations by expectation-maximisation.

Rozet, Andry, Lanusse & Louppe (2024), "Learning Diffusion Priors from Observations by
Expectation Maximization", NeurIPS.
"""

__version__ = "0.1.0"
