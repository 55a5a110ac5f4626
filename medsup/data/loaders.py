"""The training and validation loaders of a training run (what ``medsup train`` and the benches in bench/ use).

Training: a fold's training cases through :func:`medsup.data.transforms.train_transforms` (one random patch
batch per draw, ``train.iterations_per_epoch`` x batch draws per epoch, with replacement), cached in memory
(MONAI's ``CacheDataset``) or preprocessed once on disk and memory-mapped (:mod:`medsup.data.preprocessed`),
per ``train.cache``. Validation: whole cases through :func:`medsup.data.transforms.eval_transforms`, the same
preprocessing as inference.

Under several ranks each gets its shard of the cases (rank ``r`` of ``world`` takes every ``world``-th case
from ``r``); the rank arguments come from the caller, so that this module needs no distributed runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose

from medsup.config import Config
from medsup.data import preprocessed as pre
from medsup.data.datalist import Case
from medsup.data.planning import Plan
from medsup.data.transforms import augment_in_step, eval_transforms, train_random_transforms, train_transforms
from medsup.device import cache_threads, loader_workers


def training_loaders(cfg: Config, plan: Plan, cases: dict[str, Case], split: dict[str, list[str]],
                     device: torch.device, *, rank: int = 0, world: int = 1,
                     nproc_per_node: int = 1) -> tuple[DataLoader, DataLoader]:
    """``(train, val)`` loaders for this rank's share of ``split["train"]`` and ``split["val"]``.

    The training loader yields dicts of ``image`` ``(B, 1, *patch)`` float32 and ``label`` ``(B, 1, *patch)``
    float32 (or the cache's float16 and uint8 where the step augments: :func:`augment_in_step`)
    (B = ``plan.batch_size``), ``train.iterations_per_epoch`` batches per epoch; the validation loader one
    whole preprocessed case at a time (batch 1, no workers: a case is large and validation is sequential).

    Raises:
        medsup.data.preprocessed.PreprocessError: the disk cache cannot be written or read.
    """
    train_ids = split["train"][rank::world] or split["train"]  # a rank without a case of its own shares them
    val_ids = split["val"][rank::world]
    if cfg.train.val_max_cases:
        val_ids = val_ids[: cfg.train.val_max_cases]
    workers = loader_workers(cfg.train.num_workers, device, nproc_per_node)
    train_ds, val_ds = training_datasets(cfg, plan, [cases[c] for c in train_ids], [cases[c] for c in val_ids],
                                         workers, rank=rank, nproc_per_node=nproc_per_node,
                                         augment=not augment_in_step(cfg, device))
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    sampler = torch.utils.data.RandomSampler(
        train_ds, replacement=True, num_samples=cfg.train.iterations_per_epoch * plan.batch_size, generator=generator
    )
    train_loader = DataLoader(train_ds, batch_size=plan.batch_size, sampler=sampler, num_workers=workers,
                              pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)
    return train_loader, val_loader


def training_datasets(cfg: Config, plan: Plan, train_cases: Sequence[Case], val_cases: Sequence[Case],
                      workers: int, *, rank: int = 0, nproc_per_node: int = 1,
                      augment: bool = True) -> tuple[Dataset, Dataset]:
    """Training cases through :func:`train_transforms` (random state seeded per rank; augmented only with
    ``augment``, else only the patch crop, in the cache's types), validation cases through
    :func:`eval_transforms`: cached in memory or on disk per ``train.cache`` (see the module docstring)."""
    threads = cache_threads(workers)
    if pre.choose_cache(cfg, plan, train_cases, val_cases, nproc_per_node) == "disk":
        stores = {kind: pre.open_store(cfg, plan, [*train_cases, *val_cases], kind) for kind in ("train", "eval")}
        pre.fill_store(stores["train"], cfg, plan, train_cases, workers=threads)
        pre.fill_store(stores["eval"], cfg, plan, val_cases, workers=threads)
        train_tf = Compose([pre.LoadPreprocessedd(stores["train"]), *train_random_transforms(cfg, plan, augment)])
        train_tf.set_random_state(cfg.seed + rank)
        return (Dataset([{pre.CASE_KEY: c.case_id} for c in train_cases], train_tf),
                Dataset([{pre.CASE_KEY: c.case_id} for c in val_cases], pre.LoadPreprocessedd(stores["eval"])))
    train_tf = train_transforms(cfg, plan, pre.foreground_classes(cfg), augment)
    train_tf.set_random_state(cfg.seed + rank)

    def item(case: Case) -> dict[str, Any]:
        return {"image": str(case.image), "label": str(case.label)}

    # copy_cache=False: MONAI deep-copies the whole cached case for every sample by default (0.15-0.3 GB for
    # a 512x512 CT at the liver plan's spacing, 3 bytes a voxel) only to crop a patch from it; the patch crop
    # copies the patch instead, so the cache stays untouched (bench/dataload.py measures both)
    train_ds = CacheDataset([item(c) for c in train_cases], train_tf, cache_rate=cfg.train.cache_rate,
                            num_workers=threads, progress=False, copy_cache=False)
    val_ds = CacheDataset([item(c) for c in val_cases], eval_transforms(plan), cache_rate=cfg.train.cache_rate,
                          num_workers=threads, progress=False)
    return train_ds, val_ds
