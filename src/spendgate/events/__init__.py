"""What the guard decided, provably, and who hears about it.

Every decision the engine makes is an :class:`~spendgate.ledger.Event`. This package turns them into
an audit log nobody can quietly change (:mod:`.audit`: one signed hash chain per writer, with signed
checkpoints of each chain's head, verified by :mod:`.verify`) and delivers the alerts the ledger's
outbox holds (:mod:`.sender`), at least once, across restarts and instances.
"""
