"""Storage plugs: the ledger database and the image store."""
