"""Decoding of uploads, one module per media type, with the size and format limits applied there."""
