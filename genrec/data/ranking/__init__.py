"""Ranking data: real logs -> per-user chronological events with actions and task labels -> time-based splits ->
:class:`~genrec.data.ranking_batch.RankingBatch` batches; plus a plain tabular Criteo loader for DLRM sanity runs.

* :mod:`.events`: the dataset-agnostic core (sorting, splits, labels, causal dense features, rows, batches);
* :mod:`.sources`: ML-1M, Taobao UserBehavior and KuaiRand loaders (:func:`load_ranking_dataset`) and their domain
  (surface) definitions (:data:`DOMAIN_DEFINITIONS`: ML-1M user age groups and movie genre groups, Taobao category
  groups), which fill ``RankingBatch.cand_domains`` and ``RankingSchema.domains``;
* :mod:`.criteo`: Criteo DAC rows -> dense / sparse tensors (:func:`load_criteo`).

Example::

    ds = load_ranking_dataset("ml-1m", data_dir="data", split="user-last")
    print(ds.describe())
    for batch in ds.batches("train", batch_size=128, max_history=200, max_candidates=10):
        batch.validate(ds.schema)
"""

from genrec.data.ranking.criteo import (
    CriteoData,
    TabularSplit,
    load_criteo,
    read_criteo,
)
from genrec.data.ranking.events import (
    PARTS,
    SPLITS,
    RankingDataset,
    RankingRows,
    build_ranking_dataset,
)
from genrec.data.ranking.sources import (
    DOMAIN_DEFINITIONS,
    RANKING_DATASETS,
    check_domain_definition,
    find_dataset_folder,
    load_ranking_dataset,
)

__all__ = [
    "DOMAIN_DEFINITIONS",
    "PARTS",
    "RANKING_DATASETS",
    "SPLITS",
    "CriteoData",
    "RankingDataset",
    "RankingRows",
    "TabularSplit",
    "build_ranking_dataset",
    "check_domain_definition",
    "find_dataset_folder",
    "load_criteo",
    "load_ranking_dataset",
    "read_criteo",
]
