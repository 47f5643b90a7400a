"""Data: loaders (``load``), client partitions (``make_partition``) and server splits (``make_splits``)."""

from kdfl.data.datasets import CHECKSUMS, DATASETS, DataBundle, DatasetSpec, cache_dir, load
from kdfl.data.partition import (
    PARTITIONS,
    dirichlet,
    format_label_table,
    hold_out,
    iid,
    label_counts,
    make_partition,
    partition_params,
    quantity_skew,
    shards,
)
from kdfl.data.proxy import Splits, make_splits

__all__ = [
    "CHECKSUMS",
    "DATASETS",
    "PARTITIONS",
    "DataBundle",
    "DatasetSpec",
    "Splits",
    "cache_dir",
    "dirichlet",
    "format_label_table",
    "hold_out",
    "iid",
    "label_counts",
    "load",
    "make_partition",
    "make_splits",
    "partition_params",
    "quantity_skew",
    "shards",
]
