"""The training cache on disk (``train.cache: disk``): the same batches as the memory cache, reused while its
sources are unchanged, redone when they change, never written back to, and a bad case named."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset

from medsup.config import Config, load
from medsup.data import preprocessed as pre
from medsup.data.datalist import Case, load_datalist
from medsup.data.fingerprint import plan_dataset
from medsup.data.planning import Plan
from medsup.data.transforms import FG_LOCATIONS, train_cached_transforms
from medsup.train import TrainingError, run_training
from tests.unit.test_patch_sampler import loaders

FG = [1, 2]  # the tiny task's foreground classes


def setup(data: Path, tmp_path: Path, *overrides: str) -> tuple[Config, Plan, list[Case], pre.PreprocessedStore]:
    cfg = load("tiny", ["train.cache=disk", *overrides])
    plan = plan_dataset(data, cfg, tmp_path / "plan.json")
    cases = list(load_datalist(data).labelled)
    store = pre.PreprocessedStore.for_dataset(tmp_path / "pre", data, pre.store_settings(cfg, plan))
    return cfg, plan, cases, store


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.npy"))}


def test_the_disk_cache_draws_the_memory_cache_batches(msd_dataset: Path, tmp_path: Path) -> None:
    memory, memory_val = loaders(msd_dataset, tmp_path, "train.cache=memory")
    disk, disk_val = loaders(msd_dataset, tmp_path, "train.cache=disk", f"train.cache_dir={tmp_path / 'pre'}")
    assert isinstance(memory.dataset, CacheDataset) and not isinstance(disk.dataset, CacheDataset)
    assert not isinstance(disk_val.dataset, CacheDataset)
    # <dataset>-<path hash>/<settings hash>: one store for training, one for validation
    stores = {json.loads(p.read_text(encoding="utf-8"))["kind"]: p.parent  # (memo/ beside them has none)
              for p in (tmp_path / "pre").glob("ds-*/*/settings.json")}
    assert stores.keys() == {"train", "eval"}
    # the fold's cases only, and settings.json
    assert len(list(stores["train"].glob("*.json"))) == len(disk.dataset) + 1 == len(memory.dataset) + 1
    assert len(list(stores["eval"].glob("*.json"))) == len(disk_val.dataset) + 1 == len(memory_val.dataset) + 1
    before = digest(stores["train"])
    batches = list(zip(memory, disk, strict=True))
    assert len(batches) == load("tiny").train.iterations_per_epoch
    for a, b in batches:
        for key in ("image", "label"):
            assert b[key].dtype == torch.float32
            assert torch.equal(a[key].as_tensor(), b[key].as_tensor()), key
    assert digest(stores["train"]) == before, "copy-on-write maps: an epoch leaves the files as they were"
    # validation reads whole float32 volumes from its store: what the memory cache validates on, meta included
    for a, b in zip(memory_val, disk_val, strict=True):
        assert b["image"].dtype == torch.float32 and b["image"].shape == a["image"].shape
        for key in ("image", "label"):
            assert torch.equal(a[key].as_tensor(), b[key].as_tensor()), key
        assert a["image"].meta["filename_or_obj"] == b["image"].meta["filename_or_obj"]


def test_the_store_holds_what_the_memory_cache_holds(msd_dataset: Path, tmp_path: Path) -> None:
    cfg, plan, cases, store = setup(msd_dataset, tmp_path)
    pre.fill_store(store, cfg, plan, cases)
    assert pre.foreground_classes(cfg) == FG
    head = train_cached_transforms(cfg, plan, FG)
    for case in cases:
        expected = {"image": str(case.image), "label": str(case.label)}
        for t in head:
            expected = t(expected)
        got = pre.LoadPreprocessedd(store)({pre.CASE_KEY: case.case_id})
        assert got["image"].dtype == torch.float16 and got["label"].dtype == torch.uint8
        for key in ("image", "label"):
            assert torch.equal(got[key].as_tensor(), expected[key].as_tensor())
            assert torch.allclose(got[key].affine, expected[key].affine.to(got[key].affine.dtype))
            assert got[key].meta["filename_or_obj"] == str(case.image if key == "image" else case.label)
        assert got[FG_LOCATIONS].keys() == expected[FG_LOCATIONS].keys()
        for cls, where in expected[FG_LOCATIONS].items():
            assert np.array_equal(got[FG_LOCATIONS][cls], where)


def test_a_second_run_reuses_the_store_and_a_changed_case_is_done_again(msd_dataset: Path, tmp_path: Path) -> None:
    cfg, plan, cases, store = setup(msd_dataset, tmp_path)
    assert pre.fill_store(store, cfg, plan, cases)["written"] == 3
    again = pre.fill_store(store, cfg, plan, cases)
    assert (again["written"], again["reused"]) == (0, 3)
    assert again["bytes"] == store.nbytes([c.case_id for c in cases]) > 0

    # a source file edited after preprocessing (its mtime moves): that case only
    st = cases[0].label.stat()
    assert cases[0].label is not None
    os.utime(cases[0].label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    # an array cut short (a disk that filled up behind the store's back): that case only
    image = store.paths(cases[1].case_id)["image"]
    image.write_bytes(image.read_bytes()[:-100])
    # a case whose json (written last) is missing was interrupted: done again
    store.paths(cases[2].case_id)["meta"].unlink()
    assert [store.is_current(c) for c in cases] == [False, False, False]
    assert pre.fill_store(store, cfg, plan, cases)["written"] == 3
    assert all(store.is_current(c) for c in cases)

    # other preprocessing settings (the plan's spacing) live in another folder; other batch sizes do not
    other = pre.store_settings(cfg, plan.model_copy(update={"target_spacing": (3.0, 3.0, 3.0)}))
    assert pre.PreprocessedStore.for_dataset(tmp_path / "pre", msd_dataset, other).root != store.root
    same = pre.store_settings(cfg, plan.model_copy(update={"batch_size": plan.batch_size + 1}))
    assert pre.PreprocessedStore.for_dataset(tmp_path / "pre", msd_dataset, same).root == store.root
    settings = json.loads((store.root / "settings.json").read_text(encoding="utf-8"))
    assert settings["target_spacing"] == list(plan.target_spacing) and settings["version"] == pre.STORE_VERSION


def test_a_bad_case_is_named_and_the_others_stay_stored(msd_dataset: Path, tmp_path: Path) -> None:
    cfg, plan, cases, store = setup(msd_dataset, tmp_path)
    bad = cases[1]
    bad.image.write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(pre.PreprocessError) as err:
        pre.fill_store(store, cfg, plan, cases)
    assert bad.case_id in str(err.value) and str(bad.image) in str(err.value)
    assert [store.is_current(c) for c in cases] == [True, False, True]
    assert not list(store.root.glob(f"{bad.case_id}*")), "nothing half-written of the bad case"


def test_unreadable_store_files_say_which_case_and_what_to_do(msd_dataset: Path, tmp_path: Path) -> None:
    cfg, plan, cases, store = setup(msd_dataset, tmp_path)
    pre.fill_store(store, cfg, plan, cases)
    store.paths(cases[0].case_id)["label"].write_bytes(b"garbage")
    with pytest.raises(pre.PreprocessError, match=f"case {cases[0].case_id}: .*delete the folder"):
        pre.LoadPreprocessedd(store)({pre.CASE_KEY: cases[0].case_id})


def test_auto_keeps_a_small_cache_in_memory_and_sends_a_large_one_to_disk(msd_dataset: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, plan, cases, store = setup(msd_dataset, tmp_path, "train.cache=auto")
    # the estimate from the headers is what the store then takes (padding and file headers aside)
    estimate = pre.estimated_cache_bytes(plan, cases, image_bytes=2)
    pre.fill_store(store, cfg, plan, cases)
    arrays = sum(np.load(store.paths(c.case_id)[k], mmap_mode="r").nbytes for c in cases for k in ("image", "label"))
    assert 0.7 < estimate / arrays < 1.3
    assert pre.choose_cache(cfg, plan, cases) == "memory"
    monkeypatch.setattr(pre, "MEMORY_CACHE_SHARE", 1e-9)  # as if the machine had next to no free memory
    assert pre.choose_cache(cfg, plan, cases) == "disk"
    assert pre.choose_cache(load("tiny", ["train.cache=memory"]), plan, cases) == "memory"


def test_runs_sharing_a_store_preprocess_each_case_once(msd_dataset: Path, tmp_path: Path) -> None:
    # two folds started together on one machine fill the same store at the same time: each case is written by
    # one of them (under its lock); the other waits for it and finds it done
    cfg, plan, cases, store = setup(msd_dataset, tmp_path)
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: pre.fill_store(store, cfg, plan, cases), range(2)))
    assert sum(r["written"] for r in runs) == len(cases)
    assert all(r["written"] + r["reused"] == len(cases) for r in runs)
    assert all(store.is_current(c) for c in cases)


def test_loader_workers_read_the_store(msd_dataset: Path, tmp_path: Path) -> None:
    # worker processes open the memory maps themselves (the dataset holds case ids and the store's folder)
    loader = loaders(msd_dataset, tmp_path, "train.cache=disk", f"train.cache_dir={tmp_path / 'pre'}",
                     "train.num_workers=1")[0]
    assert loader.num_workers == 1
    batches = list(loader)
    assert len(batches) == load("tiny").train.iterations_per_epoch
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == batch["label"].shape
        assert batch["image"].shape[:2] == (loader.batch_size, 1)
        assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0, 2.0}


def test_a_cache_folder_that_cannot_be_written_is_named(msd_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    expected = f"cannot write the preprocessed cache in {blocker}/.*train.cache_dir"
    settings = ("train.cache=disk", f"train.cache_dir={blocker / 'pre'}")
    with pytest.raises(pre.PreprocessError, match=expected):
        loaders(msd_dataset, tmp_path, *settings)
    # training refuses with the same message, as a TrainingError (what the CLI reports), before its first step
    cfg = load("tiny", ["train.num_workers=0", "train.epochs=1", *settings])
    with pytest.raises(TrainingError, match=expected):
        run_training(cfg, msd_dataset, output=tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_real_lung_ct_preprocessed_once_as_the_memory_cache_holds_it(realdata: Path, tmp_path: Path) -> None:
    data = realdata / "lung_2mm"
    before = sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*"))
    cfg = load("lung", ["train.cache=disk", f"train.cache_dir={tmp_path / 'pre'}"], presets=["quick"])
    plan = plan_dataset(data, cfg, tmp_path / "plan.json")
    cases = list(load_datalist(data).labelled)
    result = pre.preprocess_dataset(cfg, data, plan, workers=2)
    assert (result["cases"], result["written"]) == (2, 2)
    store = pre.open_store(cfg, plan, cases, "train")
    assert str(store.root) == result["root"]
    head = train_cached_transforms(cfg, plan, pre.foreground_classes(cfg))
    for case in cases:
        expected = {"image": str(case.image), "label": str(case.label)}
        for t in head:
            expected = t(expected)
        got = pre.LoadPreprocessedd(store)({pre.CASE_KEY: case.case_id})
        for key in ("image", "label"):
            assert torch.equal(got[key].as_tensor(), expected[key].as_tensor()), (case.case_id, key)
        assert got[FG_LOCATIONS].keys() == expected[FG_LOCATIONS].keys() == {1}, "each real case has its tumour"
    assert sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*")) == before, \
        "the shared real data is only read"
