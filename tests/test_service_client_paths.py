"""A client of the service names no server file: models only from the operator's
list, LoRAs only by name from the LoRA folder, no override that is a file.
In this process (no worker); each refusal is a 422 with one line and no row."""

from __future__ import annotations

import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from framepack.errors import UserError
from framepack.service.client_paths import ClientPaths
from framepack.service.server import create_app
from framepack.service.storage import Storage
from framepack.service.store import JobStore


@pytest.fixture
def service(tmp_path):
    models = tmp_path / "models"
    (models / "allowed").mkdir(parents=True)
    store = JobStore(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    app = create_app(store, Storage(tmp_path / "storage"), models=[str(models / "allowed"), "owner/hub-model"])
    return store, TestClient(app), models


def _png() -> bytes:
    data = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(data, format="PNG")
    return data.getvalue()


def _post(client, settings: dict):
    return client.post("/api/jobs", data={"settings": json.dumps(settings)},
                       files={"image": ("a.png", _png(), "image/png")})


@pytest.mark.parametrize("settings, words", [
    ({"model": "/etc"}, "model '/etc': not a model this service runs"),
    ({"model": "other/hub-model"}, "model 'other/hub-model': not a model this service runs"),
    ({"loras": ["/srv/secret.safetensors"]}, "loras: '/srv/secret.safetensors' is a path"),
    ({"loras": [["../up.safetensors", 0.5]]}, "loras: '../up.safetensors' is a path"),
    ({"loras": "~/x.safetensors:0.8"}, "loras: '~/x.safetensors' is a path"),
    ({"overrides": ['loras=[{ path = "style", scale = 1.0 }]']}, "name LoRAs in the loras setting"),
    ({"overrides": ["options.teacache.calibration=fit.json"]}, "names a file on the server"),
    ({"overrides": ["options.someplugin.folder='/var/lib/x'"]}, "names a file on the server"),
])
def test_a_server_path_in_the_settings_gets_422_and_no_row(service, settings, words):
    store, client, _ = service
    response = _post(client, {"prompt": "a", **settings})
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"] and "\n" not in response.json()["detail"]
    assert store.list()[1] == 0


def test_the_allowed_models_bare_loras_and_plain_overrides_are_taken(service, tmp_path):
    store, client, models = service
    for settings in ({"model": str(models / "allowed")},
                     {"model": str(models / "x" / ".." / "allowed")},  # the same folder, spelled otherwise
                     {"model": "owner/hub-model"},
                     {"loras": ["style", ["other.safetensors", 0.5]]},
                     {"overrides": ["attention=sdpa", "options.teacache.rel_l1_thresh=0.2"]},
                     {}):
        response = _post(client, {"prompt": "a", **settings})
        assert response.status_code == 201, (settings, response.text)
    assert store.list()[1] == 6


def test_patching_in_a_server_path_is_refused_too(service):
    store, client, _ = service
    job_id = _post(client, {"prompt": "a"}).json()["id"]
    response = client.patch(f"/api/jobs/{job_id}", json={"settings": {"prompt": "a", "model": "/root"}})
    assert response.status_code == 422 and "not a model this service runs" in response.json()["detail"]
    assert "model" not in store.get(job_id)["settings"]


def test_a_service_without_a_model_list_takes_jobs_that_name_none():
    ClientPaths().check({"prompt": "a"})
    with pytest.raises(UserError, match="not a model this service runs"):
        ClientPaths().check({"prompt": "a", "model": "lllyasviel/FramePackI2V_HY"})


def test_the_lora_list_names_the_files_not_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({"lora_unet_single_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_single_transformer_blocks_0_attn_to_q.lora_up.weight": torch.zeros(8, 4)},
              str(folder / "style.safetensors"))
    (folder / "old.ckpt").write_bytes(b"\x80\x04pickle")
    monkeypatch.setenv("FRAMEPACK_LORA_DIR", str(folder))
    store = JobStore(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    rows = TestClient(create_app(store, Storage(tmp_path / "storage"))).get("/api/loras").json()["loras"]
    assert [r["file"] for r in rows] == ["old.ckpt", "style.safetensors"]
    assert "pickle" in rows[0]["error"] and rows[1]["modules"] == 1 and rows[1]["ranks"] == [4]
    assert str(folder) not in json.dumps(rows)


def test_serve_offers_its_model_or_else_the_hub_repos_and_each_allowed_one():
    from argparse import Namespace

    from framepack.models.sources import TRANSFORMER_REPOS
    from framepack.service.commands import _offered_models

    assert _offered_models(Namespace(model="/srv/m", allow_models=["/srv/n"])) == ["/srv/m", "/srv/n"]
    offered = _offered_models(Namespace(model=None, allow_models=[]))
    assert offered == list(TRANSFORMER_REPOS.values())  # what the workers load for a job that names none
    ClientPaths(offered).check({"prompt": "a", "model": TRANSFORMER_REPOS["f1"]})
