"""nndiag.zerocost (see docs/ARCHITECTURE.md)."""
