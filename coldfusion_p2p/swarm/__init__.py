"""The peer-to-peer side: the DHT, signed records, invites, pure swarm decisions, the all-or-nothing
fusion round and its hivemind adapter, and the daemons built on them (peer, bootstrap, archive, monitor)."""
