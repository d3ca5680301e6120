"""The ablation command: settings resolved against the run's similarity, the summary table and
plot over seeds, a finished run read back instead of retrained, one small end-to-end run."""
import json
import os

import numpy as np
import pytest

from iics_fast import ablation


def _result(maps, ari, start=0.05):
    metrics = [{"round": r, "eval": {"mAP": m, "rank1": m / 2}, "inter_quality": {"ari": a}}
               for r, (m, a) in enumerate(zip(maps, ari))]
    return {"metrics": metrics, "initial": {"mAP": start, "rank1": 0.0}}


def test_settings_pair_the_preset_similarity_with_the_other():
    names = list(ablation.settings([]))
    assert names[:4] == ["stage 1 only", "+ stage 2 on features", "+ stage 2 on J (Eq. 9)",
                         "+ stage 2 on Eq. 5 (IICS)"]
    other = ablation.settings(["--similarity", "rerank"])
    pair = [(k, v) for k, v in other.items() if k.startswith("IICS, ")]
    assert pair == [("IICS, cosine (preset: rerank)", ["--similarity", "cosine"])]
    assert ablation.settings([])["supervised (upper bound)"] == ["--supervised"]


def test_summary_statistics_and_table():
    results = {"a": [_result([0.1, 0.3], [0.2, 0.5]), _result([0.1, 0.5], [0.2, 0.7])],
               "b": [{"metrics": [{"round": 0, "eval": {"mAP": 0.2, "rank1": 0.1}}],
                      "initial": None}]}
    rows = ablation.summarise(results)
    a, b = rows
    assert a["mAP"]["mean"] == pytest.approx(0.4) and a["mAP"]["std"] == pytest.approx(
        np.std([0.3, 0.5], ddof=1))
    assert (a["mAP"]["min"], a["mAP"]["max"]) == (0.3, 0.5)
    assert a["ari"]["mean"] == pytest.approx(0.6)  # the last round's ARI
    assert a["start_mAP"]["mean"] == pytest.approx(0.05)
    assert b["ari"] is None and b["start_mAP"] is None and b["mAP"]["std"] == 0.0
    table = ablation.markdown(rows, "note")
    assert "| a | 2 | 40.0 ± 14.1 [30.0, 50.0] |" in table
    assert "| b | 1 | 20.0 ± 0.0 [20.0, 20.0] | 10.0 ± 0.0 [10.0, 10.0] | - | - |" in table
    assert table.rstrip().endswith("note")


def test_plot_writes_a_png(tmp_path):
    results = {"a": [_result([0.1, 0.3], [0.2, 0.5]), _result([0.2, 0.4], [0.2, 0.7])]}
    ablation.plot(results, str(tmp_path / "p.png"))
    assert os.path.getsize(tmp_path / "p.png") > 1000


def test_a_finished_run_is_read_back(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    done = _result([0.3], [0.4])
    (out / "done.json").write_text(json.dumps(done))
    assert ablation.run_one(["--this-would-fail"], str(out)) == done


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="set by the ablation"):
        ablation.main(["--out", str(tmp_path), "--seed", "3"])
    with pytest.raises(ValueError, match="matches no setting"):
        ablation.main(["--out", str(tmp_path), "--only", "nothing like it"])


def test_out_naming_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ValueError, match="cannot make the output folder"):
            ablation.main(["--out", str(out), "--only", "stage 1 only"])
