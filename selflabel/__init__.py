"""selflabel: label an unannotated image collection (SeLa, SwAV, Leopart), review and export."""

__version__ = "0.1.0"
