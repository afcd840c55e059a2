"""Per model family: loading components, latent <-> video frame mapping, VAE decode, text encoding."""
