"""Node-level cluster code: who holds which blob pieces, and how they move between peers.

Dependencies point down: this package may use the node, its peers, the store and the download
package, never the daemon or the control API. Each idea is a module: :mod:`.holdings` (the blobs
this node serves and what peers announced), :mod:`.piece_server` (answering peers' piece
messages), :mod:`.piece_client` (asking peers).
"""
