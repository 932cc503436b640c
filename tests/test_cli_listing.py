"""`framepack plugins` and `framepack make-tiny-model` through the CLI."""

from __future__ import annotations

import json

from framepack.cli import main


def test_plugins_json_lists_every_family_with_source_and_availability(capsys, monkeypatch):
    monkeypatch.setenv("FRAMEPACK_HARDWARE", '{"device": "cpu"}')
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    families = data["families"]
    assert set(families) == {"attention", "offload", "cache", "text_encoder", "image_encoder", "vae", "writer"}
    sdpa = next(e for e in families["attention"] if e["name"] == "sdpa")
    assert sdpa["available"] and sdpa["reason"] is None
    assert "built-in" in sdpa["source"] and "framepack_plugins.attention.sdpa" in sdpa["source"]


def test_plugins_text_output(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "attention:" in out and "sdpa" in out and "writer:" in out and "mp4" in out


def test_make_tiny_model_refuses_a_non_empty_folder(tmp_path, capsys):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(["make-tiny-model", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("framepack: error:") and str(target) in err
    assert (target / "keep.txt").read_text() == "mine"
