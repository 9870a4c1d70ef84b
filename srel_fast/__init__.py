"""srel-fast: Squeeze, Recover, Relabel (SRe2L) dataset condensation, fast."""

__version__ = "0.1.0"
