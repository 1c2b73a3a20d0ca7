"""Distributed evaluation: 2 gloo ranks evaluate an odd-sized set exactly as one process does.

Each rank evaluates a disjoint slice (no item padded in twice) and the sums and counts are reduced
across ranks: through ``evaluate(..., mesh=)``, the ``Evaluate`` action and a mesh-aware eval step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist_eval")
    code, log = dist_worker.finish(dist_worker.torchrun("eval", "--out", str(out)))
    assert code == 0, log[-4000:]
    return [json.loads((out / f"eval_rank{rank}.json").read_text()) for rank in (0, 1)]


def test_each_rank_evaluates_a_disjoint_slice_and_together_every_item_once(reports):
    ids = [set(r["ids"]) for r in reports]
    assert len(reports[0]["ids"]) + len(reports[1]["ids"]) == dist_worker.EVAL_ITEMS  # no padding duplicates
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(dist_worker.EVAL_ITEMS))


@pytest.mark.parametrize("how", ["evaluate", "action", "mesh_step"])
def test_two_rank_evaluation_of_an_odd_sized_set_equals_one_process(reports, how):
    single = reports[0]["single"]
    assert single["n"] == dist_worker.EVAL_ITEMS
    for report in reports:  # every rank gets the global result
        got = report[how]
        assert got["n"] == single["n"] and got["id_sum"] == single["id_sum"] == sum(range(dist_worker.EVAL_ITEMS))
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-6)
