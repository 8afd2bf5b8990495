"""nndiag.diagnosis (see docs/ARCHITECTURE.md)."""
