"""The peer's presence in the swarm (swarm/presence.py): how often it reads and how long its record lives."""

from __future__ import annotations

from coldfusion_p2p.swarm.presence import poll_seconds, record_ttl


def test_reads_slow_down_with_the_record_period_so_big_swarms_spare_the_dht():
    assert poll_seconds(0.5) == 0.2, "the tests' fast records: at most 5 reads a second"
    assert poll_seconds(2.0) == 0.5, "the default: a quarter of the refresh period"
    assert poll_seconds(0.1) == 0.2


def test_a_record_outlives_a_few_missed_refreshes_and_never_less_than_3_s():
    assert record_ttl(2.0) == 6.0 and record_ttl(0.5) == 3.0
