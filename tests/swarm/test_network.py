"""Starting a node's DHT (swarm/network.py): busy initial peers get more tries, refusing ones do not."""

from __future__ import annotations

from coldfusion_p2p.swarm.network import JOIN_ATTEMPTS, PING_TIMEOUT, busy_not_refused


def test_a_start_whose_pings_timed_out_is_tried_again_while_tries_are_left():
    assert busy_not_refused(PING_TIMEOUT + 0.5, attempt=1), "16 peers starting at once on 2 cores: a busy entry"
    assert busy_not_refused(PING_TIMEOUT, attempt=JOIN_ATTEMPTS - 1)
    assert not busy_not_refused(PING_TIMEOUT + 0.5, attempt=JOIN_ATTEMPTS), "no tries left"


def test_a_start_refused_at_once_is_not_tried_again():
    assert not busy_not_refused(0.4, attempt=1), "a moderated run refusing a node without an invite answers fast"
