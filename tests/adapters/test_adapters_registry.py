"""AdapterRegistry: atomic publishing, id allow-list, list/get/delete, concurrency, validation."""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest

from loramux.adapters import registry as reg_mod
from loramux.adapters.errors import AdapterError
from loramux.adapters.registry import AdapterRegistry

W, C = "adapter_model.safetensors", "adapter_config.json"


def files(d: Path) -> tuple[bytes, bytes]:
    return (d / C).read_bytes(), (d / W).read_bytes()


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_add_get_list_delete(tmp_path, valid_dir, llama_spec):
    reg = AdapterRegistry(tmp_path / "reg")
    info = reg.add_files("tenant-a.lora_1", *files(valid_dir), tenant="acme", spec=llama_spec)
    assert info.adapter_id == "tenant-a.lora_1" and info.tenant == "acme"
    assert info.rank == 4 and info.targets == ("q_proj", "v_proj", "down_proj")
    assert info.size == sum(len(b) for b in files(valid_dir)) and info.created > 0
    assert reg.get("tenant-a.lora_1") == info and reg.path_of("tenant-a.lora_1") == info.path
    assert sorted(os.listdir(info.path)) == sorted([C, W, "loramux.json"])
    reg.add_files("other", *files(valid_dir), tenant="zeta")
    assert [i.adapter_id for i in reg.list()] == ["other", "tenant-a.lora_1"]
    assert [i.adapter_id for i in reg.list(tenant="zeta")] == ["other"]
    assert "path" not in reg.info_dict("other") and reg.info_dict("other")["targets"] == list(info.targets)
    reg.delete("other")
    assert reg.get("other") is None and "other" not in reg and visible(reg.root) == ["tenant-a.lora_1"]
    with pytest.raises(AdapterError) as ei:
        reg.delete("other")
    assert ei.value.status == 404


def test_conflict_and_overwrite(tmp_path, valid_dir):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add_files("a", *files(valid_dir), tenant="t1")
    with pytest.raises(AdapterError, match="already exists") as ei:
        reg.add_files("a", *files(valid_dir))
    assert ei.value.status == 409
    info = reg.add_files("a", *files(valid_dir), tenant="t2", overwrite=True)
    assert info.tenant == "t2" and visible(tmp_path / "reg") == ["a"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 129, ".hidden", "..", "a\n", "a b", "a\\b", "-x",
                                 "é", None, 5])
def test_invalid_ids_refused(bad, tmp_path, valid_dir):
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(AdapterError, match="invalid adapter_id") as ei:
        reg.add_files(bad, *files(valid_dir))
    assert ei.value.status == 400 and ei.value.field == "adapter_id"
    assert reg.path_of(bad) is None and reg.get(bad) is None
    assert visible(reg.root) == [] and not (tmp_path / "x").exists()


def test_longest_id_and_bad_tenant(tmp_path, valid_dir):
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.add_files("x" * 128, *files(valid_dir)).adapter_id == "x" * 128
    with pytest.raises(AdapterError) as ei:
        reg.add_files("y", *files(valid_dir), tenant="../t")
    assert ei.value.field == "tenant"


def test_crash_mid_write_leaves_nothing_visible(tmp_path, valid_dir, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    real_write = reg_mod._write

    def dying_write(path: Path, data: bytes):
        if path.name == W:  # half the weights reach the disk, then the "process dies"
            path.write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(reg_mod, "_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        reg.add_files("a", *files(valid_dir))
    assert reg.get("a") is None and reg.list() == [] and visible(tmp_path / "reg") == []  # cleaned on unwind
    # A hard kill skips the cleanup too: the half-written temp folder stays but is never visible ...
    monkeypatch.setattr(reg_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        reg.add_files("a", *files(valid_dir))
    monkeypatch.undo()
    left = visible(tmp_path / "reg")
    assert len(left) == 1 and left[0].startswith(".tmp-") and reg.list() == [] and reg.get("a") is None
    # ... and the next start removes it.
    reg2 = AdapterRegistry(tmp_path / "reg")
    assert visible(tmp_path / "reg") == [] and reg2.list() == []
    assert reg2.add_files("a", *files(valid_dir)).adapter_id == "a"


def test_failed_replace_keeps_old_version(tmp_path, valid_dir, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    old = reg.add_files("a", *files(valid_dir), tenant="old")
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):  # publishing the new version fails after the old moved aside
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(reg_mod.os, "rename", failing_rename)
    with pytest.raises(OSError):
        reg.add_files("a", *files(valid_dir), tenant="new", overwrite=True)
    monkeypatch.undo()
    assert reg.get("a").tenant == "old" and (old.path / W).read_bytes() == files(valid_dir)[1]
    assert visible(tmp_path / "reg") == ["a"]
    # A kill between moving the old version aside and publishing the new one: restart restores the old.
    aside = tmp_path / "reg" / ".old-a-zz9_x"
    aside.mkdir()
    os.rename(old.path, aside / "x")
    (tmp_path / "reg" / ".tmp-half").mkdir()
    reg2 = AdapterRegistry(tmp_path / "reg")
    assert visible(tmp_path / "reg") == ["a"] and reg2.get("a").tenant == "old"


def test_validation_with_spec_writes_nothing(tmp_path, valid_dir, llama_spec):
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(AdapterError, match="max LoRA rank"):
        reg.add_files("a", *files(valid_dir), spec=dataclasses.replace(llama_spec, max_lora_rank=2))
    with pytest.raises(AdapterError, match="not valid JSON"):
        reg.add_files("b", b"{", files(valid_dir)[1])  # config is checked even without a spec
    with pytest.raises(AdapterError, match="truncated"):
        reg.add_files("c", files(valid_dir)[0], files(valid_dir)[1][:-3])
    with pytest.raises(AdapterError, match="tokenizer_config.json"):
        reg.add_files("d", *files(valid_dir), tokenizer_config=b"[]")
    with pytest.raises(AdapterError) as ei:
        AdapterRegistry(tmp_path / "reg", max_weights_bytes=100).add_files("e", *files(valid_dir))
    assert ei.value.status == 413
    assert visible(tmp_path / "reg") == []


def test_concurrent_adds(tmp_path, valid_dir, llama_spec):
    reg = AdapterRegistry(tmp_path / "reg")
    cfg, w = files(valid_dir)
    errors: list[BaseException] = []

    def add(i: int):
        try:
            reg.add_files(f"ad-{i}", cfg, w, tenant=f"t{i % 2}", spec=llama_spec)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and [i.adapter_id for i in reg.list()] == [f"ad-{i}" for i in range(8)]
    assert len(reg.list(tenant="t0")) == 4 and visible(tmp_path / "reg") == [f"ad-{i}" for i in range(8)]
    # Same id from many threads: exactly one wins, the rest get 409.
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(_try(reg, "same", cfg, w))) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(map(str, results)) == ["409"] * 5 + ["ok"]


def _try(reg, aid, cfg, w):
    try:
        reg.add_files(aid, cfg, w)
        return "ok"
    except AdapterError as exc:
        return exc.status


def test_add_dir_copies_only_adapter_files(tmp_path, valid_dir):
    (valid_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    (valid_dir / "adapter_model.bin").write_bytes(b"pickle")
    (valid_dir / "README.md").write_text("hi")
    reg = AdapterRegistry(tmp_path / "reg")
    info = reg.add_dir("a", valid_dir)
    assert sorted(os.listdir(info.path)) == sorted([C, W, "loramux.json", "tokenizer_config.json"])
    (valid_dir / W).unlink()
    with pytest.raises(AdapterError, match="pickle checkpoints are not accepted") as ei:
        reg.add_dir("b", valid_dir)
    assert ei.value.status == 422 and reg.get("b") is None


def test_hand_placed_folder_and_symlink(tmp_path, valid_dir):
    import shutil
    root = tmp_path / "reg"
    root.mkdir()
    shutil.copytree(valid_dir, root / "manual")
    (root / "escape").symlink_to(valid_dir, target_is_directory=True)
    (root / "junk").mkdir()  # not an adapter: not listed
    reg = AdapterRegistry(root)
    assert [i.adapter_id for i in reg.list()] == ["manual"]
    info = reg.get("manual")
    assert info.rank == 4 and info.tenant is None and info.targets == ("q_proj", "v_proj", "down_proj")
    assert reg.path_of("escape") is None and reg.get("escape") is None
