"""Adapters over REST: upload a PEFT adapter -> list -> get -> complete with it (== PEFT) -> delete -> 404."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

import loramux.server.api.adapters as api_adapters
from loramux.adapters.demo import write_random_adapter

PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119]  # token ids of the demo model's byte vocabulary


@pytest.fixture(scope="module")
def adapter_files(demo_server, tmp_path_factory):
    rt = demo_server[1]
    cfg = json.loads((rt.model_dir / "config.json").read_text())
    folder = write_random_adapter(tmp_path_factory.mktemp("peft"), cfg, r=8, alpha=16.0,
                                  targets=["q_proj", "v_proj", "down_proj"], seed=21)
    return folder, {"adapter_config.json": (folder / "adapter_config.json").read_bytes(),
                    "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes()}


def _upload(base, adapter_id, files, **kw):
    return httpx.post(base + "/v1/adapters", data={"id": adapter_id}, files=files, timeout=60, **kw)


def _peft_greedy(model_dir, adapter_dir, prompt, n):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_upload_list_get_complete_delete(demo_server, adapter_files):
    base, rt = demo_server
    folder, files = adapter_files
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    up = _upload(base, "rest-peft", files)
    assert up.status_code == 201, up.text
    card = up.json()
    assert card["id"] == "rest-peft" and card["object"] == "adapter" and card["rank"] == 8
    assert sorted(card["targets"]) == ["down_proj", "q_proj", "v_proj"] and card["size_bytes"] > 0
    assert card["location"] in ("disk", "cpu", "gpu") and card["parent"] == rt.model_name
    assert "path" not in json.dumps(card) and str(rt.config.cache_dir) not in json.dumps(card)

    listed = httpx.get(base + "/v1/adapters").json()
    assert listed["object"] == "list" and "rest-peft" in [a["id"] for a in listed["data"]]
    assert httpx.get(base + "/v1/adapters/rest-peft").json()["rank"] == 8
    models = {m.id: m for m in client.models.list().data}
    assert models["rest-peft"].parent == rt.model_name and models["rest-peft"].root == "rest-peft"
    assert models[rt.model_name].parent is None

    kw = dict(prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    ours = client.completions.create(model="rest-peft", **kw)
    base_out = client.completions.create(model=rt.model_name, **kw)
    assert ours.model == "rest-peft" and ours.choices[0].text != base_out.choices[0].text
    want = _peft_greedy(rt.model_dir, folder, PROMPT, 8)
    assert ours.choices[0].text == rt.tokenizer.decode(want)
    assert httpx.get(base + "/v1/adapters/rest-peft").json()["location"] in ("cpu", "gpu")

    r = httpx.delete(base + "/v1/adapters/rest-peft")
    assert r.status_code == 200 and r.json() == {"id": "rest-peft", "object": "adapter", "deleted": True}
    r = httpx.get(base + "/v1/adapters/rest-peft")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="rest-peft", **kw)
    assert httpx.delete(base + "/v1/adapters/rest-peft").status_code == 404
    assert "rest-peft" not in [m.id for m in client.models.list().data]


def test_duplicate_id_is_409(demo_server, adapter_files):
    base, _ = demo_server
    assert _upload(base, "rest-dup", adapter_files[1]).status_code == 201
    try:
        r = _upload(base, "rest-dup", adapter_files[1])
        assert r.status_code == 409 and r.json()["error"]["type"] == "conflict_error"
    finally:
        httpx.delete(base + "/v1/adapters/rest-dup")


def test_files_may_be_named_by_filename(demo_server, adapter_files):
    base, _ = demo_server
    files = [("files", (name, data)) for name, data in adapter_files[1].items()]
    r = _upload(base, "rest-by-filename", files)
    assert r.status_code == 201, r.text
    httpx.delete(base + "/v1/adapters/rest-by-filename")


def test_bad_uploads_are_4xx(demo_server, adapter_files):
    base, _ = demo_server
    files = adapter_files[1]
    cfg = json.loads(files["adapter_config.json"])
    cases = [
        (lambda: httpx.post(base + "/v1/adapters", files=files), 400, "id"),
        (lambda: _upload(base, "x1", {"adapter_config.json": files["adapter_config.json"]}), 400, "safetensors"),
        (lambda: _upload(base, "x2", dict(files, **{"model.bin": b"pickle"})), 400, "unexpected file"),
        (lambda: _upload(base, "../escape", files), 400, "invalid"),
        (lambda: _upload(base, "x3", dict(files, **{"adapter_config.json": b"{nope"})), 400, "JSON"),
        (lambda: _upload(base, "x4", dict(files, **{"adapter_model.safetensors": b"\x00" * 20})), 400, None),
        (lambda: _upload(base, "x5", dict(files, **{"adapter_config.json": json.dumps(dict(cfg, r=512)).encode()})),
         None, None),
        (lambda: httpx.post(base + "/v1/adapters", json={"id": "x6"}), 400, "multipart"),
    ]
    for send, status, text in cases:
        r = send()
        assert 400 <= r.status_code < 500, r.text
        assert status is None or r.status_code == status, r.text
        assert text is None or text in r.json()["error"]["message"], r.text
    ids = [a["id"] for a in httpx.get(base + "/v1/adapters").json()["data"]]
    assert not {"x1", "x2", "x3", "x4", "x5", "x6"} & set(ids)


def test_size_limit_is_413(demo_server, adapter_files, monkeypatch):
    base, _ = demo_server
    monkeypatch.setattr(api_adapters, "max_adapter_bytes", lambda rt: 1000)
    r = _upload(base, "too-big", adapter_files[1])  # weights over the limit, the body under limit + slack
    assert r.status_code == 413 and "1000" in r.json()["error"]["message"]
    monkeypatch.setattr(api_adapters, "SIDE_FILES_BYTES", 0)
    r = _upload(base, "too-big", adapter_files[1])  # Content-Length over the limit: refused before reading
    assert r.status_code == 413
    req = httpx.Request("POST", base, data={"id": "too-big"}, files=adapter_files[1])
    body, ctype = req.read(), req.headers["content-type"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    r = httpx.post(base + "/v1/adapters", content=chunks(), timeout=60, headers={"content-type": ctype})
    assert r.status_code == 413
    assert httpx.get(base + "/v1/adapters/too-big").status_code == 404
