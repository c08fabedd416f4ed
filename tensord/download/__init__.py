"""Background downloads of model layers: registries, parallel ranged fetches, resume, digests."""
