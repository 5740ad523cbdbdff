"""The WAN model both the benchmark (``bench/scale.py --wan``) and the delay line use.

No root needed: the model's figures are what the benchmark's RTT columns are divided by
and what the 30-agent test's links do, so they are checked here — the loss share and its
bursts, the RTTs against the sourced table, and the delay line's per-pair ordering.
"""

from __future__ import annotations

import asyncio
import itertools
import os

from bench.wan import PROFILES, GilbertElliott, Wan, region_rtt_ms
from tests.netns.delayline import DelayLine
from tests.util import wait_for_async


def test_lossy_profile_loses_two_percent_in_bursts() -> None:
    wan = Wan(PROFILES["global-lossy"], 50, seed=3)
    drops = [wan.delay(0, 1) is None for _ in range(200_000)]
    share = sum(drops) / len(drops)
    assert 0.015 <= share <= 0.025, share
    # bursty: a loss right after a loss is far likelier than a loss on its own
    after_loss = [b for a, b in itertools.pairwise(drops) if a]
    assert sum(after_loss) / len(after_loss) > 5 * share


def test_lossless_profiles_lose_nothing_and_rtts_follow_the_table() -> None:
    for name in ("lan", "continent", "global"):
        wan = Wan(PROFILES[name], 200, seed=1)
        assert all(wan.delay(a, (a + 7) % 200) is not None for a in range(200))
    assert region_rtt_ms("us-east-1", "eu-central-1") == region_rtt_ms("eu-central-1",
                                                                       "us-east-1")
    assert 80 < region_rtt_ms("us-east-1", "eu-west-1") < 81       # the table's 80.5
    wan = Wan(PROFILES["global"], 1000, seed=1)
    stats = wan.rtt_stats()
    assert 150 < stats["median_rtt_ms"] < 260 and stats["p99_rtt_ms"] < 450, stats
    # access links: 5-40 ms added to every round trip of the node
    assert all(0.005 <= a <= 0.040 for a in wan.access)


def test_gilbert_elliott_stationary_share() -> None:
    bad = GilbertElliott.P_GOOD_TO_BAD / (GilbertElliott.P_GOOD_TO_BAD +
                                          GilbertElliott.P_BAD_TO_GOOD)
    per_link = bad * GilbertElliott.LOSS_BAD + (1 - bad) * GilbertElliott.LOSS_GOOD
    assert 0.009 < per_link < 0.011     # ~1 % per access link, ~2 % end to end


def test_delay_line_keeps_a_pairs_order_and_delays_it() -> None:
    """Packets of one pair leave in the order they came (TCP over the line is not
    reordered by jitter), each after the model's one-way delay."""

    class Jumpy:
        """A model whose delays shrink: without the FIFO rule they would reorder."""

        def __init__(self) -> None:
            self.d = 0.05

        def delay(self, a: int, b: int) -> float:
            self.d -= 0.01
            return self.d

    async def run() -> list[bytes]:
        r, w = os.pipe()
        os.set_blocking(r, False)
        line = DelayLine(Jumpy(), [-1, w], ["10.78.0.10", "10.78.0.11"])
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for k in range(4):
            pkt = bytearray(28)
            pkt[0] = 0x45
            pkt[12:16] = bytes([10, 78, 0, 10])
            pkt[16:20] = bytes([10, 78, 0, 11])
            pkt[20] = k
            line._forward(0, bytes(pkt))
        data = bytearray()

        def all_out() -> bool:
            try:
                data.extend(os.read(r, 4096))
            except BlockingIOError:
                pass
            return len(data) >= 4 * 28

        try:
            await wait_for_async(all_out, timeout=5, interval=0.005,
                                 what="the 4 packets out of the delay line")
        finally:
            os.close(r)
            os.close(w)
        assert loop.time() - t0 >= 0.04          # none left before the first one's delay
        assert line.stats()["packets"] == 4
        return [bytes(data[i * 28 + 20:i * 28 + 21]) for i in range(4)]

    assert asyncio.run(run()) == [b"\x00", b"\x01", b"\x02", b"\x03"]
