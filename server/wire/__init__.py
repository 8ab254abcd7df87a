"""The realtime wire protocol, as both ends speak it: client events (client_events), typed server events
(server_events, items, vita_events), audio codecs, the base64 / data-URL decoder and the error codes.

It imports nothing else of the server (nor duplex/ or models/): the Python client imports it, and only
it, of the server (tests/test_wire.py checks both).
"""
