"""reed: REED-VAE training, edit chains and metrics for round-trip-robust VAE decoders."""

__version__ = "0.1.0"
