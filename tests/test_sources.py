"""Adapter sources: local folders, the Hugging Face Hub cache, and S3 through a real loopback server.

References: the adapter uploaded to S3 is written by PEFT's ``save_pretrained``
(a tiny transformers Llama), and S3 is moto's HTTP server (see fixtures_s3.py).
Files are compared byte for byte (no tolerance: a download must be exact).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from qadapt.adapters import sources
from qadapt.adapters.sources import MANIFEST, adapter_subfolder, resolve_adapter, split_source
from qadapt.errors import InputError, QadaptError, SourceError

pytest_plugins = ["fixtures_s3"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter folder (tiny random transformers Llama, r=4 on q/v)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, pad_token_id=0, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("peft") / "a1"
    model.save_pretrained(out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file, leaving out qadapt's cache manifest."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def upload(server, bucket: str, prefix: str, folder: Path) -> None:
    client = server.client()
    existing = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    for rel, data in files_of(folder).items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


@pytest.fixture
def gets(monkeypatch) -> list[str]:
    """Keys of the GetObject calls qadapt makes (a boto3 event hook on the clients it creates)."""
    calls: list[str] = []
    make = sources._s3_client

    def counting_client():
        client = make()
        client.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: calls.append(params["Key"]))
        return client

    monkeypatch.setattr(sources, "_s3_client", counting_client)
    return calls


# --------------------------------------------------------------------------- S3


def test_s3_download_is_byte_identical_to_peft_save_pretrained_and_cached(s3_env, peft_adapter, gets):
    upload(s3_env, "bucket-main", "adapters/a1", peft_adapter)
    upload(s3_env, "bucket-main", "adapters/a10", peft_adapter)  # must not leak into a1 (prefix a1/ only)
    folder = resolve_adapter("s3://bucket-main/adapters/a1")
    assert folder == Path(os.environ["QADAPT_CACHE"]) / "s3" / "bucket-main" / "adapters" / "a1"
    assert files_of(folder) == files_of(peft_adapter)
    assert sorted(gets) == sorted(f"adapters/a1/{rel}" for rel in files_of(peft_adapter))

    gets.clear()
    assert resolve_adapter("s3://bucket-main/adapters/a1/", "s3") == folder
    assert gets == []  # second resolve: listing only, no object downloaded


def test_s3_changed_object_is_downloaded_again_and_removed_object_dropped(s3_env, peft_adapter, gets):
    upload(s3_env, "bucket-change", "x", peft_adapter)
    folder = resolve_adapter("s3://bucket-change/x")
    client = s3_env.client()
    new_config = b'{"r": 4, "changed": true}'
    client.put_object(Bucket="bucket-change", Key="x/adapter_config.json", Body=new_config)
    client.delete_object(Bucket="bucket-change", Key="x/README.md")
    gets.clear()
    assert resolve_adapter("s3://bucket-change/x") == folder
    assert gets == ["x/adapter_config.json"]
    assert (folder / "adapter_config.json").read_bytes() == new_config
    assert not (folder / "README.md").exists()
    assert (folder / "adapter_model.safetensors").read_bytes() == (peft_adapter / "adapter_model.safetensors").read_bytes()


def test_s3_endpoint_from_lorax_variable_alone(s3_env, peft_adapter, monkeypatch):
    upload(s3_env, "bucket-lorax", "a", peft_adapter)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_env.url)
    assert files_of(resolve_adapter("s3://bucket-lorax/a")) == files_of(peft_adapter)


def test_s3_listing_follows_every_page(s3_env, peft_adapter, monkeypatch):
    monkeypatch.setattr(sources, "_PAGE_SIZE", 1)
    upload(s3_env, "bucket-pages", "a", peft_adapter)
    assert files_of(resolve_adapter("s3://bucket-pages/a")) == files_of(peft_adapter)


def test_s3_missing_bucket_names_the_url(s3_env):
    with pytest.raises(SourceError, match=r"s3://no-such-bucket-x/a1.*bucket does not exist"):
        resolve_adapter("s3://no-such-bucket-x/a1")


def test_s3_empty_prefix_names_the_url(s3_env, peft_adapter):
    upload(s3_env, "bucket-empty", "adapters/a10", peft_adapter)
    with pytest.raises(SourceError, match=r"s3://bucket-empty/adapters/a1 .*no objects under the prefix `adapters/a1/`"):
        resolve_adapter("s3://bucket-empty/adapters/a1")


def test_s3_unknown_credentials_name_the_url(s3_env, moto_auth_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_auth_server.url)
    with pytest.raises(SourceError, match=r"s3://bucket-auth/a1 .*access key id is not known"):
        resolve_adapter("s3://bucket-auth/a1")


def test_s3_missing_credentials_name_the_url(s3_env, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SourceError, match=r"s3://bucket-nocreds/a1 .*no AWS credentials"):
        resolve_adapter("s3://bucket-nocreds/a1")


def test_s3_unreachable_endpoint_names_the_url(s3_env, closed_endpoint):
    with pytest.raises(SourceError, match=r"s3://bucket-down/a1 .*unreachable"):
        resolve_adapter("s3://bucket-down/a1")


def test_s3_unreachable_endpoint_falls_back_to_a_complete_cache(s3_env, peft_adapter, request):
    upload(s3_env, "bucket-offline", "a1", peft_adapter)
    folder = resolve_adapter("s3://bucket-offline/a1")
    request.getfixturevalue("closed_endpoint")
    assert resolve_adapter("s3://bucket-offline/a1") == folder
    (folder / "adapter_model.safetensors").unlink()  # no longer complete: not trusted
    with pytest.raises(SourceError, match="unreachable"):
        resolve_adapter("s3://bucket-offline/a1")


def test_s3_interrupted_download_leaves_no_partial_file(s3_env, peft_adapter, gets, monkeypatch):
    from botocore.exceptions import ResponseStreamingError

    upload(s3_env, "bucket-cut", "a1", peft_adapter)
    big = (peft_adapter / "adapter_model.safetensors").stat().st_size
    monkeypatch.setattr(sources, "_CHUNK", 256)
    cut = {"on": True}

    class DropsMidway:
        """A progress bar whose update fails once the last (largest) object is half read."""

        def __init__(self, total, desc):
            self.left = total - big // 2

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.left -= n
            if cut["on"] and self.left <= 0:
                raise ResponseStreamingError(error="connection reset by peer")

    monkeypatch.setattr(sources, "_make_progress", DropsMidway)
    with pytest.raises(SourceError, match=r"s3://bucket-cut/a1 \(object `a1/adapter_model.safetensors`\)"):
        resolve_adapter("s3://bucket-cut/a1")
    folder = Path(os.environ["QADAPT_CACHE"]) / "s3" / "bucket-cut" / "a1"
    assert not (folder / "adapter_model.safetensors").exists()
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    assert sources._read_manifest(folder)["complete"] is False

    cut["on"] = False
    gets.clear()
    assert resolve_adapter("s3://bucket-cut/a1") == folder
    assert gets == ["a1/adapter_model.safetensors"]  # the objects completed before the cut are kept
    assert files_of(folder) == files_of(peft_adapter)


@pytest.mark.parametrize("key", ["a1/../escape.json", "a1/sub/../../x", "a1//abs.json", "a1/" + MANIFEST,
                                 "a1/sub/" + MANIFEST])
def test_s3_refuses_keys_that_leave_the_cache_folder(s3_env, key):
    client = s3_env.client()
    client.create_bucket(Bucket="bucket-evil")
    client.put_object(Bucket="bucket-evil", Key="a1/adapter_config.json", Body=b"{}")
    client.put_object(Bucket="bucket-evil", Key=key, Body=b"x")
    try:
        with pytest.raises(SourceError, match=r"s3://bucket-evil/a1: refusing object `" + key.replace(".", r"\.")):
            resolve_adapter("s3://bucket-evil/a1")
        cache = Path(os.environ["QADAPT_CACHE"])
        assert not any(p.name in ("escape.json", "x") for p in cache.rglob("*"))
    finally:
        client.delete_object(Bucket="bucket-evil", Key=key)


def test_s3_concurrent_resolves_download_each_object_once(s3_env, peft_adapter, gets):
    upload(s3_env, "bucket-race", "a1", peft_adapter)
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_adapter("s3://bucket-race/a1"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    assert sorted(gets) == sorted(f"a1/{rel}" for rel in files_of(peft_adapter))
    assert files_of(results[0]) == files_of(peft_adapter)


@pytest.mark.parametrize("url", ["s3://bkt/a/../b", "s3:///a", "s3://bkt/a/./b"])
def test_s3_url_with_unsafe_prefix_is_an_input_error(url, tmp_path):
    with pytest.raises(InputError, match=url.replace(".", r"\.")):
        resolve_adapter(url, cache_dir=tmp_path)


def test_revision_applies_to_the_hub_only(tmp_path):
    with pytest.raises(InputError, match="Hub adapters only"):
        resolve_adapter("s3://bkt/a", revision="main")
    with pytest.raises(InputError, match="expected one of local, hub, s3"):
        resolve_adapter(str(tmp_path), "ftp")


# --------------------------------------------------------------------------- Hub (huggingface_hub's cache layout)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An HF cache holding ``org/name`` at one commit, as snapshot_download lays it out; offline mode on."""
    cache = tmp_path / "hf" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--name"
    snap = repo / "snapshots" / commit
    (snap / "sub").mkdir(parents=True)
    (snap / "adapter_config.json").write_text('{"r": 4}')
    (snap / "sub" / "adapter_config.json").write_text('{"r": 8}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_hub_id_resolves_to_the_cached_snapshot_offline(hub_cache):
    assert resolve_adapter("org/name") == hub_cache
    assert resolve_adapter("org/name", "hub", revision=hub_cache.name) == hub_cache
    assert resolve_adapter("org/name", subfolder="sub") == hub_cache / "sub"


def test_hub_id_not_cached_offline_says_what_to_do(hub_cache):
    with pytest.raises(SourceError, match=r"`org/other` is not in the local Hugging Face cache .*HF_HUB_OFFLINE=1 is set"):
        resolve_adapter("org/other")


def test_hub_subfolder_escape_is_refused(hub_cache):
    with pytest.raises(InputError, match=r"`\.\.` component"):
        resolve_adapter("org/name", subfolder="../x")


def test_neither_path_nor_hub_id_is_an_input_error(tmp_path):
    for source in (str(tmp_path / "missing" / "deep" / "x"), "no_slash_name", "bad--id/x"):
        with pytest.raises(InputError, match="does not exist and it is not a Hub id"):
            resolve_adapter(source)


# --------------------------------------------------------------------------- local


def test_local_folder_resolves_to_itself(tmp_path):
    (tmp_path / "a1").mkdir()
    assert resolve_adapter(str(tmp_path / "a1")) == (tmp_path / "a1").resolve()
    assert resolve_adapter(str(tmp_path), "local", subfolder="a1") == (tmp_path / "a1").resolve()


def test_local_missing_path_and_file_are_named(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'nope'} does not exist"):
        resolve_adapter(str(tmp_path / "nope"), "local")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"adapter_model\.safetensors is a file; expected a folder"):
        resolve_adapter(str(tmp_path / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- NAME=SOURCE and sub-folders


def test_split_source():
    assert split_source("math=org/math-lora") == ("math", "org/math-lora")
    assert split_source(" code = s3://b/k=v ") == ("code", "s3://b/k=v")
    for bad, what in (("org/math-lora", "expected NAME=SOURCE"), ("=org/x", "name is empty"), ("math=", "source is empty")):
        with pytest.raises(InputError, match=what):
            split_source(bad)


def test_adapter_subfolder_stays_inside_root(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "inner").symlink_to(root / "a")
    (root / "leak").symlink_to(tmp_path / "outside")
    assert adapter_subfolder(root, "a") == root / "a"
    assert adapter_subfolder(root, "a/b") == root / "a" / "b"
    assert adapter_subfolder(root, "inner") == root / "inner"
    for name, why in (("..", r"`\.\.`"), ("a/../../x", r"`\.\.`"), ("/etc", "absolute"), ("", "empty"),
                      ("leak", "outside"), ("leak/x", "outside")):
        with pytest.raises(InputError, match=why) as info:
            adapter_subfolder(root, name)
        assert isinstance(info.value, QadaptError) and str(root) in str(info.value)
