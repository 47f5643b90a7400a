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
from kdfl.data.partition_file import export, read_partition, split_config, write_partition
from kdfl.data.proxy import FixedRows, Splits, make_splits

__all__ = [
    "CHECKSUMS",
    "DATASETS",
    "PARTITIONS",
    "DataBundle",
    "DatasetSpec",
    "FixedRows",
    "Splits",
    "cache_dir",
    "dirichlet",
    "export",
    "format_label_table",
    "hold_out",
    "iid",
    "label_counts",
    "load",
    "make_partition",
    "make_splits",
    "partition_params",
    "quantity_skew",
    "read_partition",
    "shards",
    "split_config",
    "write_partition",
]
