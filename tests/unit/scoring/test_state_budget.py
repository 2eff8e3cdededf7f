"""The pipeline's per-key state bounded in bytes (``max_state_bytes``, from state.max_bytes):
a flood of new 200-character keys stays within the budget, and the keys with a baseline
(the stores, the global statistics) outlive the flood's one-off keys."""

from __future__ import annotations

import random
import string

import orjson

from stream_detector.config import load_settings
from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.scoring.batch import score_batch
from stream_detector.scoring.factory import build_pipeline, event_schema

BUDGET = 2 * 1024 * 1024


def test_a_flood_of_new_keys_stays_within_the_budget_and_spares_the_warm_keys():
    settings = load_settings(environ={"STREAM_DETECTOR_AUTOENCODER__ENABLED": "false", "STREAM_DETECTOR_STATE__MAX_BYTES": str(BUDGET)})
    pipeline, schema = build_pipeline(settings), event_schema(settings)
    assert pipeline.max_state_bytes == BUDGET
    events = [event for event, _ in SalesGenerator(GeneratorConfig(seed=4)).generate(9_000)]
    rng = random.Random(4)

    def new_id() -> str:
        return "".join(rng.choices(string.ascii_letters, k=200))

    normal = [orjson.dumps(e) for e in events[:3_000]]
    flood = [orjson.dumps({**e, "store_id": new_id(), "product_id": new_id(), "customer_id": new_id()}) for e in events[3_000:]]
    for start in range(0, len(normal), 500):
        score_batch(pipeline, schema, normal[start : start + 500])
    zscore = next(d for d in pipeline.detectors if d.name == "zscore")
    stores = zscore.n_keys()["store_id"]

    forgotten = 0
    for start in range(0, len(flood), 500):
        forgotten += score_batch(pipeline, schema, flood[start : start + 500]).result.forgotten_keys
        assert pipeline.state_bytes() <= BUDGET

    assert forgotten > 0
    keys = zscore.n_keys()
    assert keys["global"] == 1
    assert 0 < keys["store_id"] < 6_000  # most of the flood's stores were forgotten
    # The stores that had a baseline are still known: the flood's one-off stores went first.
    known = zscore.state_dict()["key_sets"]["store_id"]["keys"]
    assert sum(len(k) < 200 for k in known) == stores
