"""WilKE hyperparameters: ROME's, plus the scan.

ROME's ``consistent_keys`` chooses the rank-one rule of every candidate (wilke/wilke_main.py): false,
as in every shipped file, is the paper's algorithm; true (``hparams/WilKE/*_rrome.json``) makes WilKE
choose and apply r-ROME updates (Gupta et al. 2024), the layer choice for a rank-one editor without
ROME's disabling edits.
"""
from __future__ import annotations

import dataclasses

from rome.rome_hparams import ROMEHyperParams
from util.hparams import HParamsError

SCANS = ("exact", "approximate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WilKEHyperParams(ROMEHyperParams):
    scanning_ceiling: int  # candidate layers are 0 .. scanning_ceiling-1
    # Approximate scan (off by default): rank every candidate with approx_grad_steps optimisation
    # passes, then run the full optimisation only for the approx_top_k best and choose among them.
    # 5 and 2 chose the exact scan's layer on every one of the 64 SmolLM2 edits measured by
    # experiments.bench (2 and 2: 81%); see README, Speed.
    scan: str = "exact"
    approx_grad_steps: int = 5
    approx_top_k: int = 2

    def validate(self) -> None:
        super().validate()
        if self.scanning_ceiling < 1:
            raise HParamsError("field 'scanning_ceiling' must be at least 1")
        if self.scan not in SCANS:
            raise HParamsError(f"field 'scan' is {self.scan!r}; expected one of {SCANS}")
        if self.approx_grad_steps < 1 or self.approx_top_k < 1:
            raise HParamsError("fields 'approx_grad_steps' and 'approx_top_k' must be at least 1")

    @property
    def candidate_layers(self) -> list[int]:
        return list(range(self.scanning_ceiling))

    @property
    def statistics_layers(self) -> list[int]:
        return self.candidate_layers

    @property
    def rough(self) -> "WilKEHyperParams":
        """The approximate scan's settings: ``approx_grad_steps`` optimisation passes."""
        return self.replace(v_num_grad_steps=self.approx_grad_steps)

    @property
    def norm_anchor_layers(self) -> list[int]:
        return self.candidate_layers  # the scan solves a value at every candidate

    @property
    def norm_anchor_variants(self) -> list["WilKEHyperParams"]:
        return [self.rough, self] if self.scan == "approximate" else [self]
