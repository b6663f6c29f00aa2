"""Every Burrow block class, and their Prefect twins (see blocks/base.py)."""

from __future__ import annotations

from blocks.base import BurrowBlock, prefect_twin


def register_twins(classes: list[type[BurrowBlock]] | None = None) -> list[type]:
    """Make (and so register with Prefect's block registry) the twin of each class; by default
    every Burrow block class. Returns the twins."""
    if classes is None:
        classes = block_classes()
    return [prefect_twin(c) for c in classes]


def block_classes() -> list[type[BurrowBlock]]:
    """Every Burrow block class that can be saved (imports the S3 store's module)."""
    from blocks.consul import ConsulCluster
    from blocks.etcd import EtcdCluster
    from blocks.keys import EncryptionKeys
    from blocks.local import LocalStore
    from blocks.retention import RetentionPolicy
    from blocks.s3 import S3Store
    from blocks.zookeeper import ZooKeeperCluster

    return [ZooKeeperCluster, EtcdCluster, ConsulCluster, LocalStore, S3Store, EncryptionKeys, RetentionPolicy]
