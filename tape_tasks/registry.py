"""The TAPE tasks, listed explicitly: name -> where its files are, how its records become examples, which head.

A new task is one :class:`TaskSpec` added to :data:`TASKS` (and, if its records are new, one dataset class in
``datasets.py``). Nothing is registered as a side effect of importing a module, unlike TAPE's decorator registry.

Task names, folders, file stems and split names are TAPE's (``tape/datasets.py``), so ``--data_dir`` can point at
TAPE's download::

    secondary_structure    secondary_structure/secondary_structure_{train,valid,casp12,ts115,cb513}
    secondary_structure_8  same files, 8-state labels (ss8)
    contact_prediction     proteinnet/proteinnet_{train,valid,test}
    remote_homology        remote_homology/remote_homology_{train,valid,test_fold_holdout,test_family_holdout,
                                                            test_superfamily_holdout}
    fluorescence           fluorescence/fluorescence_{train,valid,test}
    stability              stability/stability_{train,valid,test}
    masked_language_modeling  pfam/pfam_{train,valid,holdout}

Any other split present on disk can be named too (``--split``): the embedded data's secondary-structure test set
is ``secondary_structure_test`` because it is not CASP12, TS115 or CB513.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import datasets

#: TAPE's number of fold classes for remote homology (used unless the data directory says otherwise).
TAPE_NUM_FOLDS = 1195


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str
    file_stem: str
    head: str                  # 'value', 'sequence_classification', 'token_classification', 'contact' or 'mlm'
    make_dataset: Callable     # (records, tokenizer, num_labels, seed) -> TAPEDataset
    num_labels: int = 1
    splits: tuple[str, ...] = ("train", "valid", "test")
    train_split: str = "train"
    valid_split: str = "valid"
    metrics: tuple[str, ...] = field(default=())
    description: str = ""

    def resolve_num_labels(self, data_dir: Optional[str]) -> int:
        """Classes of this task; remote homology reads ``remote_homology_label_maps.json`` when present."""
        if self.name == "remote_homology" and data_dir:
            path = os.path.join(data_dir, self.folder, "remote_homology_label_maps.json")
            if os.path.exists(path):
                with open(path) as f:
                    return len(json.load(f)["fold_label"])
        return self.num_labels

    def dataset(self, data_dir: str, split: str, tokenizer=None, data_format: str = "auto", seed: int = 0,
                num_labels: Optional[int] = None) -> datasets.TAPEDataset:
        records = datasets.open_split(data_dir, self.folder, self.file_stem, split, data_format)
        labels = num_labels if num_labels is not None else self.resolve_num_labels(data_dir)
        return self.make_dataset(records, tokenizer, labels, seed)


TASKS: dict[str, TaskSpec] = {
    "secondary_structure": TaskSpec(
        "secondary_structure", "secondary_structure", "secondary_structure", "token_classification",
        lambda r, t, n, s: datasets.SecondaryStructureDataset(r, t, "ss3", n), num_labels=3,
        splits=("train", "valid", "casp12", "ts115", "cb513"), metrics=("accuracy",),
        description="3-state secondary structure per residue (ss3: H, E, C)"),
    "secondary_structure_8": TaskSpec(
        "secondary_structure_8", "secondary_structure", "secondary_structure", "token_classification",
        lambda r, t, n, s: datasets.SecondaryStructureDataset(r, t, "ss8", n), num_labels=8,
        splits=("train", "valid", "casp12", "ts115", "cb513"), metrics=("accuracy",),
        description="8-state secondary structure per residue (ss8: G, H, I, B, E, S, T, C)"),
    "contact_prediction": TaskSpec(
        "contact_prediction", "proteinnet", "proteinnet", "contact",
        lambda r, t, n, s: datasets.ProteinnetDataset(r, t), num_labels=2,
        metrics=("precision_at_l5", "precision_at_l2", "precision_at_l"),
        description="residue-residue contacts (< 8 A) from tertiary coordinates"),
    "remote_homology": TaskSpec(
        "remote_homology", "remote_homology", "remote_homology", "sequence_classification",
        lambda r, t, n, s: datasets.RemoteHomologyDataset(r, t, n), num_labels=TAPE_NUM_FOLDS,
        splits=("train", "valid", "test_fold_holdout", "test_family_holdout", "test_superfamily_holdout"),
        metrics=("accuracy",), description="SCOP fold class of a protein"),
    "fluorescence": TaskSpec(
        "fluorescence", "fluorescence", "fluorescence", "value",
        lambda r, t, n, s: datasets.ValueDataset(r, t, "log_fluorescence", "fluorescence"),
        metrics=("spearmanr", "mse", "mae"), description="log fluorescence of a GFP variant (regression)"),
    "stability": TaskSpec(
        "stability", "stability", "stability", "value",
        lambda r, t, n, s: datasets.ValueDataset(r, t, "stability_score", "stability"),
        metrics=("spearmanr", "mse", "mae"), description="stability score of a designed protein (regression)"),
    "masked_language_modeling": TaskSpec(
        "masked_language_modeling", "pfam", "pfam", "mlm",
        lambda r, t, n, s: datasets.MaskedLanguageModelingDataset(r, t, seed=s), num_labels=30,
        splits=("train", "valid", "holdout"), metrics=("accuracy",),
        description="masked-token prediction on Pfam (the pretraining objective)"),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; tasks: {sorted(TASKS)}") from None
