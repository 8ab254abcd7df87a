"""clients layer of vita-duplex."""
