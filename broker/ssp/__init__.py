"""Sans-IO core of mosh's State Synchronization Protocol (SSP).

The layers follow mosh's ``src/network``: the datagram (nonce, AES-128-OCB3,
timestamps, RTT, roaming), fragments, the transport instruction, and above
them the sender, the receiver and the session.  Nothing here does I/O or
reads a clock: bytes, ``now`` (float seconds, monotonic) and a
``random_bytes(n)`` callable come in as arguments.  Import the submodules you
need; this package imports none of them.
"""
