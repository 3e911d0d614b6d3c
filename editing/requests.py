"""Edit requests: ROME's ``requested_rewrite`` dicts, and the few ways the harness derives them."""
from __future__ import annotations

import copy


def normalise_request(request: dict) -> dict:
    """A copy whose targets carry the leading space ROME expects."""
    req = copy.deepcopy(request)
    for side in ("target_new", "target_true"):
        if side in req and not req[side]["str"].startswith(" "):
            req[side]["str"] = " " + req[side]["str"]
    return req


def record_request(record: dict) -> dict:
    """The request of a dataset record: its ``requested_rewrite`` with the record's case_id."""
    request = copy.deepcopy(record["requested_rewrite"])
    request["case_id"] = record["case_id"]
    return request


def swapped_request(request: dict) -> dict:
    """The roll-back request: the same prompt with target_new and target_true exchanged."""
    back = copy.deepcopy(request)
    back["target_new"], back["target_true"] = request["target_true"], request["target_new"]
    return back
