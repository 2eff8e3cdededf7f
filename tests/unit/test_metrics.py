"""``observe_many`` (a whole array into a histogram) against the client's own ``observe``."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from stream_detector.metrics import SCORE_BUCKETS, observe_many


def _exposition_without_created(registry: CollectorRegistry) -> dict[str, float]:
    from prometheus_client import generate_latest

    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#") or not line or "_created" in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


@pytest.mark.parametrize("labelled", [False, True])
def test_observe_many_equals_repeated_observe(labelled):
    rng = np.random.default_rng(0)
    values = np.r_[rng.random(2000), 1 - 10.0 ** -rng.uniform(1, 7, 500), list(SCORE_BUCKETS), [0.0, 1.0, 2.0, -1.0, np.nan]]
    regs = [CollectorRegistry(), CollectorRegistry()]
    hists = []
    for reg in regs:
        if labelled:
            h = Histogram("s", "help", ["detector"], buckets=SCORE_BUCKETS, registry=reg).labels("zscore")
        else:
            h = Histogram("s", "help", buckets=SCORE_BUCKETS, registry=reg)
        hists.append(h)
    for v in values:
        if not np.isnan(v):
            hists[0].observe(float(v))
    observe_many(hists[1], values)
    observe_many(hists[1], np.array([]))
    a, b = (_exposition_without_created(r) for r in regs)
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("s_sum"):
            assert b[key] == pytest.approx(a[key], rel=1e-9)
        else:
            assert b[key] == a[key], key
