"""The per-case memo of the data check and the fingerprint (``medsup.data.memo``): the same report and plan as
reading every case, nothing read again while a case's files are unchanged, a changed or bad case read again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medsup.config import load
from medsup.data.check import check_dataset
from medsup.data.fingerprint import fingerprint_dataset
from medsup.data.memo import CaseMemo, dataset_folder, source


def test_the_memo_gives_what_reading_gives_and_is_used_while_files_are_unchanged(msd_dataset: Path,
                                                                                 tmp_path: Path) -> None:
    cfg = load("tiny")
    memo = CaseMemo(tmp_path / "memo")
    plain_report, plain_print = check_dataset(msd_dataset, cfg), fingerprint_dataset(msd_dataset, cfg)
    for _ in range(2):  # the first fills the memo, the second reads it
        report, fingerprint = check_dataset(msd_dataset, cfg, memo), fingerprint_dataset(msd_dataset, cfg, memo)
        assert report.ok and report.stats == plain_report.stats
        assert fingerprint == plain_print  # hash included: the plan cannot tell
    assert len(list((tmp_path / "memo" / "check").glob("*.json"))) == 3
    assert len(list((tmp_path / "memo" / "fingerprint").glob("*_sample.npy"))) == 3

    # proof that the memo is what answers: a label spoilt behind its back, keeping its size and mtime (what the
    # memo trusts, as the preprocessed cache does), still passes; once its mtime moves it is read and refused
    label_path = msd_dataset / "labelsTr" / "case1.nii.gz"
    st = label_path.stat()
    label_path.write_bytes(b"\0" * st.st_size)
    os.utime(label_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_dataset(msd_dataset, cfg, memo).ok
    os.utime(label_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    refused = check_dataset(msd_dataset, cfg, memo)
    assert not refused.ok and [p.case_id for p in refused.problems] == ["case1"]
    # a failure is never memoised: the memo still holds the old pass, which no longer matches the file
    assert check_dataset(msd_dataset, cfg, memo).problems == refused.problems


def test_other_settings_do_not_reuse_the_memo(msd_dataset: Path, tmp_path: Path) -> None:
    memo = CaseMemo(tmp_path / "memo")
    fingerprint_dataset(msd_dataset, load("tiny"), memo)
    other = load("tiny", ["data.fingerprint_samples=150"])
    assert fingerprint_dataset(msd_dataset, other, memo) == fingerprint_dataset(msd_dataset, other)
    assert fingerprint_dataset(msd_dataset, other, memo)["foreground"]["samples"] == 3 * 150


def test_the_memo_exists_only_where_the_dataset_has_a_disk_cache(msd_dataset: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSUP_PREPROCESSED", str(tmp_path / "cache"))
    assert CaseMemo.for_dataset("memory", None, msd_dataset) is None
    assert CaseMemo.for_dataset("auto", None, msd_dataset) is None
    memo = CaseMemo.for_dataset("disk", None, msd_dataset)
    assert memo is not None and memo.root == dataset_folder(tmp_path / "cache", msd_dataset) / "memo"
    memo.root.mkdir(parents=True)
    # once a disk cache folder exists for the dataset (train.cache auto chose disk before), every start uses it
    assert CaseMemo.for_dataset("auto", None, msd_dataset) is not None
    # a memo that cannot be written is skipped, not an error
    blocked = CaseMemo(tmp_path / "a-file" / "memo")
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    assert fingerprint_dataset(msd_dataset, load("tiny"), blocked)["cases"] == ["case0", "case1", "case2"]
    assert np.isfinite(fingerprint_dataset(msd_dataset, load("tiny"), blocked)["foreground"]["mean"])


def test_a_series_folder_changes_when_a_file_in_it_is_rewritten(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(bytes([i]) * 100)
    before = source(series)
    assert source(series) == before
    folder_mtime = series.stat().st_mtime_ns
    st = (series / "1.dcm").stat()
    (series / "1.dcm").write_bytes(b"x" * 100)  # rewritten in place: the same name and size
    os.utime(series / "1.dcm", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.utime(series, ns=(folder_mtime, folder_mtime))  # the folder's own mtime does not move
    assert source(series) != before
