"""Trio I/O: transports, framed streams, connections and pools. Drives ``tensord.wire``."""
