"""WISE (Wang et al., NeurIPS 2024; code in EasyEdit ``easyeditor/models/wise``, WISE-Retrieve),
lifelong as EasyEdit's ``sequential_edit=True``: one side memory kept across edits.

The weights never change. An edit trains the side memory W' (training.py); every ``save_freq``
edits W' is stored as a shard and a fresh one starts, every ``merge_freq`` edits the newest shards
are merged (side_memory.py); at inference the router picks the memory per sequence (router.py).
Upstream rebuilds the side memory on every call unless its undeclared ``sequential_edit`` flag is set;
here the editor keeps it for the run, and it is saved with the run's checkpoints.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.wise.router import Activation
from baselines.wise.side_memory import SideMemory
from baselines.wise.training import edit_rows, train_side_memory
from baselines.wise.wise_hparams import WISEHyperParams
from dsets.files import locate_or_download
from dsets.records import DataFormatError, read_json_list
from editing.requests import normalise_request
from editing.resources import EditResources
from util.globals import Paths
from util.scoring import model_device, target_ids

if TYPE_CHECKING:
    pass

LOG = logging.getLogger(__name__)


def unrelated_texts(paths: Paths, name: str) -> list[str]:
    """``loc + " " + loc_ans`` of every record of a zsRE file (MEND format), the rows upstream's
    example pairs with its edits, one per edit in order."""
    path = locate_or_download(paths, name)
    texts = []
    for i, record in enumerate(read_json_list(path)):
        if not isinstance(record, dict) or not isinstance(record.get("loc"), str) or not isinstance(record.get("loc_ans"), str):
            raise DataFormatError(f"{path}: record {i} lacks the text fields 'loc' and 'loc_ans' WISE's unrelated rows need")
        texts.append(f"{record['loc']} {record['loc_ans']}")
    if not texts:
        raise DataFormatError(f"{path}: no records for WISE's unrelated rows")
    return texts


def execute_wise(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: WISEHyperParams,
                 memory: SideMemory, templates: Sequence[str], unrelated: Sequence[str], act: Activation,
                 resources: EditResources) -> dict:
    """Train ``memory`` (in place) on one request; returns what happened, JSON-ready."""
    req = normalise_request(request)
    prompt, target = req["prompt"].format(req["subject"]), target_ids(tok, req["target_new"]["str"])
    unrelated_text = unrelated[memory.n_edits % len(unrelated)]
    rows = edit_rows(tok, prompt, target, templates, unrelated_text, model_device(model))
    memory.start_edit(hparams)
    losses = train_side_memory(model, hparams, memory, rows, act, resources.forward_checked)
    shard_threshold = memory.threshold
    done = memory.finish_edit(hparams)
    LOG.info("WISE edit %d: loss %.3f -> %.3f in %d steps; shard threshold %.4g%s", memory.n_edits, losses[0],
             losses[-1], len(losses), shard_threshold, f"; shard {' and '.join(done)}" if done else "")
    return {"loss": [losses[0], losses[-1]], "steps": len(losses), "shard_threshold": shard_threshold,
            "shard_events": done, "n_memories": len(memory.memories), "n_edits": memory.n_edits,
            "memory_bytes": memory.nbytes}
