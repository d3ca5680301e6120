"""benchmarks/report.py: the records folder it reads and the memory notes it writes."""
import json
import os

from benchmarks import report


def _record(date, memory):
    return {"op": "merge (average linkage)", "size": "N=4000", "date": date,
            "ours": {"label": "iics_fast"}, "memory": memory}


def test_newest_folder_is_chosen_by_the_records_dates_not_file_times(tmp_path, monkeypatch):
    for tag, date in (("old-machine", "2026-01-01T00:00:00Z"), ("new-machine", "2026-06-01T00:00:00Z")):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "r.json").write_text(json.dumps(_record(date, {})))
    os.utime(tmp_path / "old-machine" / "r.json", (2e9, 2e9))  # a later file time, as a clone may give
    os.utime(tmp_path / "new-machine" / "r.json", (1e9, 1e9))
    (tmp_path / "empty-machine").mkdir()
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert report.load()[0] == "new-machine"
    assert report.load("old-machine")[0] == "old-machine"


def test_one_cpu_name_of_two_generations_gets_two_folders():
    from benchmarks.conftest import machine_tag

    zen4 = {"cpu": "AMD EPYC", "cpu_family": 25, "cpu_model": 17, "cores": 2}
    zen5 = {**zen4, "cpu_family": 26, "cpu_model": 2}
    assert machine_tag(zen4) == "amd-epyc-f25m17-2c" != machine_tag(zen5) == "amd-epyc-f26m2-2c"
    assert machine_tag({"cpu": "arm64", "cores": 4}) == "arm64-4c"  # no numbers: the name alone
    assert "(CPU family 26, model 2)" in report.machine_line(zen5)


def test_memory_notes_give_each_records_own_how():
    records = [_record("d", {"ours": {"peak_mb": 3.0, "how": "in this process: VmHWM reset"},
                             "fastcluster": {"peak_mb": 9.0}, "SciPy": {"error": "failed"}})]
    notes = report.memory_notes(records)
    assert notes == ["- in this process: VmHWM reset:", "  - merge (average linkage) N=4000: iics_fast",
                     f"- {report.FRESH_PROCESS}:", "  - merge (average linkage) N=4000: fastcluster"]


def test_peak_memory_counts_memory_reused_from_freed_heap():
    """Heap memory freed before the block and taken again inside it is counted: PeakMemory
    releases the free heap first. Without that release the block below grows by about 0 MB."""
    import ctypes

    import pytest

    from benchmarks import probes
    from benchmarks.probes import PeakMemory

    if not probes.HAVE_MALLOC_TRIM:
        pytest.skip("no malloc_trim here (not glibc): PeakMemory cannot release the free heap")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size, count = 64 << 10, 1600  # 100 MB in blocks below the mmap threshold: heap memory

    def fill():
        blocks = [libc.malloc(size) for _ in range(count)]
        for b in blocks:
            libc.memset(b, 1, size)
        return blocks

    *first, pin = fill()  # the last block stays: above the freed ones, free() cannot trim them
    for b in first:
        libc.free(b)
    with PeakMemory() as mem:
        again = fill()
    for b in [*again, pin]:
        libc.free(b)
    assert mem.grew_mib > 80
