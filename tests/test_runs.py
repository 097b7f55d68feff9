"""The output folder life cycle, upstream lookup and secrets."""
import json

import pytest

from perm.runs import MissingUpstream, StageRun, upstream


def test_partial_folder_then_atomic_rename(tmp_path):
    run = StageRun(tmp_path, "sft", "t", {"TAG": "t"})
    assert run.path.name == "t.partial" and (run.path / "config.json").exists()
    assert not (tmp_path / "sft" / "t").exists()
    (run.path / "adapter.bin").write_text("new")
    run.finish({"loss": 1.0})
    final = tmp_path / "sft" / "t"
    assert json.loads((final / "metrics.json").read_text())["loss"] == 1.0 and not run.path.exists()


def test_rerun_replaces_a_finished_tag_only_when_it_finishes(tmp_path):
    first = StageRun(tmp_path, "sft", "t", {})
    (first.path / "weights").write_text("old")
    first.finish({})
    second = StageRun(tmp_path, "sft", "t", {})
    (second.path / "weights").write_text("new")
    assert (tmp_path / "sft" / "t" / "weights").read_text() == "old"   # a crash here loses nothing
    second.finish({})
    assert (tmp_path / "sft" / "t" / "weights").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["t"]


def test_missing_or_unfinished_upstream_names_the_script(tmp_path):
    with pytest.raises(MissingUpstream) as e:
        upstream(tmp_path, "sft", "warm")
    assert "02_sft.py TAG=warm" in str(e.value.code) and "does not exist" in str(e.value.code)
    StageRun(tmp_path, "data", "x", {})       # started, never finished
    with pytest.raises(MissingUpstream) as e:
        upstream(tmp_path, "data", "x")
    assert "01_build_data.py TAG=x" in str(e.value.code) and "unfinished" in str(e.value.code)


def test_secret_from_the_environment_never_reaches_config(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "sk-test-secret-123456")
    run = StageRun(tmp_path, "reward", "t", {"JUDGE_BASE_URL": "http://x?key=sk-test-secret-123456"})
    run.finish({"note": "sk-test-secret-123456"})
    for path in (tmp_path / "reward" / "t").iterdir():
        assert "sk-test-secret-123456" not in path.read_text()
