"""A cheap first pass (`prefilter_fraction`): a cheaper scorer ranks the whole pool, and the full features are
computed only for its top rows, among which the selection is made.

The cheaper scorer is the method itself (the same projection, the same validation loss) with features from the
last `prefilter_layers` decoder layers only (`capture.GradientLayers`: a forward and a backward of those layers),
at one checkpoint: the first one the selection uses, so that a live warm-up (ROSECallback) knows the candidates
from that save on and computes the full features of the candidates only, at every selected checkpoint.

    rose/prefilter_l<L>/prefilter.json          the checkpoint the first pass ran at (name, name@adapter-hash)
    rose/prefilter_l<L>/train/<checkpoint>/     its pool store (every row; gradient_layers L in its meta)
    rose/prefilter_l<L>/val_<kind>/<checkpoint>/  its validation store

The candidates are not stored: they are the top `prefilter_fraction` of the pool by the first pass's scores
(shared between subtasks as `subtask_balance` says), recomputed from these stores whenever they are needed, so
that scoring again (another fraction, another method on the same stores) needs no gradient pass.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from accelerate import PartialState

from rose_trl.gradients.featurizer import Featurizer
from rose_trl.scoring.columns import PREFILTER_SCORE, PREFILTERED_OUT, SCORE
from rose_trl.scoring.scores import CheckpointGradients, score_checkpoints, select_rows, validation_targets
from rose_trl.stores.store import CorruptStoreError, GradientStore
from rose_trl.stores.validation import ValidationGradients
from rose_trl.utils.files import atomic_write_json, read_json


class Prefilter:
    """The first pass of a `ROSESelector` whose config sets `prefilter_fraction`."""

    def __init__(self, selector):
        self.selector = selector
        c = self.config = selector.config
        self.folder = selector.rose_dir / f"prefilter_l{c.prefilter_layers}"
        self.record = self.folder / "prefilter.json"
        main = selector.validation_stores
        self.validation = ValidationGradients(
            selector.validation,
            selector.tokenizer,
            c,
            self.folder,
            selector.validation_fingerprint,
            selector.max_length,
            main.use_cpu,
            main.ddp_backend,
        )
        self.validation._dpo_trainers = main._dpo_trainers  # one DPO trainer per model, whichever layers
        self._featurizer: Featurizer | None = None

    def featurizer(self, main: Featurizer) -> Featurizer:
        """The run's projection, features from the last prefilter_layers decoder layers."""
        if self._featurizer is None:
            self._featurizer = Featurizer(main.projector, gradient_layers=self.config.prefilter_layers)
        return self._featurizer

    def checkpoint(self) -> str | None:
        """The checkpoint the first pass ran at, when its stores are complete."""
        found = read_json(self.record)
        if found is None:
            return None
        try:
            complete = all(
                GradientStore.open(folder / found["checkpoint"]).is_complete
                for folder in (self.folder / "train", self.validation.folder)
            )
        except CorruptStoreError:
            return None
        return found["checkpoint"] if complete else None

    def run(self, model, name: str, identity: dict, adam_state) -> np.ndarray:
        """The first pass at checkpoint `name` (the live `model`), unless one already ran (at any checkpoint).
        Returns its candidates (`candidates`)."""
        if self.checkpoint() is None:
            self._first_pass(model, name, identity, adam_state)
        return self.candidates()

    def _first_pass(self, model, name: str, identity: dict, adam_state) -> None:
        s, state = self.selector, PartialState()
        featurizer = self.featurizer(s.prepare_featurizer(model))
        common = {**identity, "extra": {"gradient_layers": self.config.prefilter_layers}}
        desc = f"First pass ({self.config.prefilter_layers} layers) @ {name}"
        s.extract_pool(model, self.folder / "train" / name, featurizer, common, adam_state, desc)
        self.validation.pairs_per_pass = s.validation_stores.pairs_per_pass
        self.validation.sft_rows_per_pass = s.validation_stores.sft_rows_per_pass
        self.validation.head_tokens = s.validation_stores.head_tokens
        self.validation.reference = s.validation_stores.reference
        self.validation.store(model, name, featurizer, common, write=state.is_main_process)
        s.validation_stores.reference = self.validation.reference
        state.wait_for_everyone()
        if state.is_main_process:
            atomic_write_json(self.record, {"checkpoint": name, "identity": identity["checkpoint"]})
        state.wait_for_everyone()

    def table(self) -> tuple[dict[str, np.ndarray], list[str]]:
        """The first pass's score table (its one checkpoint) and the subtasks."""
        name = self.checkpoint()
        if name is None:
            raise ValueError(
                f"{self.folder} holds no finished first pass (prefilter_fraction): select again from the warm-up "
                "to compute it"
            )
        train = GradientStore.open(self.folder / "train" / name)
        grads = {name: self.validation.read(name, train.meta["projection"])}
        subtasks = list(self.selector.validation["subtask"])
        targets = validation_targets(grads, subtasks, self.config.validation_aggregation)
        return score_checkpoints([CheckpointGradients(name, train, targets.targets[0], 1.0)], targets.subtasks), (
            targets.subtasks
        )

    def score(self, checkpoints: list[CheckpointGradients], subtasks: list[str]) -> tuple[dict, dict]:
        """The full scores of the candidates (`checkpoints`: their full features), every row keeping its first-pass
        score (PREFILTER_SCORE; PREFILTERED_OUT: not a candidate), and the summary's account of the first pass."""
        candidates = self.candidates()
        table = score_checkpoints(checkpoints, subtasks, rows=candidates)
        table[PREFILTER_SCORE] = self.table()[0][SCORE]
        table[PREFILTERED_OUT] = np.isnan(table[SCORE])
        first_pass = {
            "checkpoint": self.checkpoint(),
            "layers": self.config.prefilter_layers,
            "fraction": self.config.prefilter_fraction,
            "candidates": len(candidates),
        }
        return table, first_pass

    def candidates(self) -> np.ndarray:
        """The pool rows the first pass keeps (sorted): its top prefilter_fraction, shared between subtasks as
        subtask_balance says."""
        table, subtasks = self.table()
        rows, _ = select_rows(
            table,
            subtasks,
            self.config.prefilter_fraction,
            self.config.subtask_balance,
            Counter(self.selector.validation["subtask"]),
        )
        return np.sort(rows)
