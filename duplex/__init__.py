"""duplex layer of vita-duplex."""
