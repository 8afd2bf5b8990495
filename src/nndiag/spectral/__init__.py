"""nndiag.spectral (see docs/ARCHITECTURE.md)."""
