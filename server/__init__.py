"""server layer of vita-duplex."""
