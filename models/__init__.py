"""models layer of vita-duplex."""
