"""Model families: loading and per-family helpers (AnimateDiff: :mod:`.animatediff`)."""
