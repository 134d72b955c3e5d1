"""The bits of ``SSPSession._flags``: one int per session instead of five
attributes (a million idle sessions keep it), shared by the session and its
mixins."""

CLOSED = 1  # the shutdown handshake is over (either side's)
SERVER = 2  # we are the server (direction bit 1); only a server roams
HOLD_ACKS = 4  # acknowledge a state only after confirm_durable()
PEER_SHUTDOWN = 8  # the peer's shutdown state arrived (reported once)
SEQ_REQUESTED = 16  # a SequenceReservationRequested awaits confirmation
ACKS_OVERFLOWED = 32  # held acks: a state came with the arrival list full
ASKS_ACKS = 64  # our empty diffs go as the state's ACK_REQUEST_DIFF (asks_acks)
