"""Demo checkpoints are built through coqui's own classes; loading fails with the seed's clear message."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from batching import demo, loading
from batching.errors import ModelNotLoadedError
from testing.voices import ROOT


def weights_digest(folder) -> str:
    state = torch.load(folder / "model.pth", map_location="cpu", weights_only=False)["model"]
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].cpu().numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_weights_other_seed_other_weights(tiny_checkpoint, tmp_path):
    demo.build(tmp_path / "a", size="tiny", seed=0)
    demo.build(tmp_path / "b", size="tiny", seed=1)
    assert weights_digest(tmp_path / "a") == weights_digest(tiny_checkpoint)
    assert weights_digest(tmp_path / "b") != weights_digest(tiny_checkpoint)


def test_cli_builds_a_loadable_tiny_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    run = subprocess.run([sys.executable, "-m", "batching.demo", str(out), "--size", "tiny", "--seed", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "demo checkpoint (tiny, seed 3)" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["DEMO.json", "config.json", "model.pth", "vocab.json"]
    marker = json.loads((out / "DEMO.json").read_text())
    assert marker["demo"] is True and marker["seed"] == 3
    loaded = loading.load(out, device="cpu")
    assert loaded.demo == marker


@pytest.mark.slow
def test_small_checkpoint_has_the_small_dimensions_and_loads(tmp_path):
    demo.build(tmp_path, size="small")
    loaded = loading.load(tmp_path, device="cpu")
    args = loaded.model.args
    assert (args.gpt_layers, args.gpt_n_model_channels, args.gpt_n_heads) == (6, 512, 8)


def test_full_config_has_the_released_dimensions():
    """The config a `--size full` checkpoint gets, built without its 1.9 GB of weights."""
    config, vocab_json = demo.config_for("full")
    args = config.to_dict()["model_args"]  # what config.json holds
    assert (args["gpt_layers"], args["gpt_n_model_channels"], args["gpt_n_heads"]) == (30, 1024, 16)
    assert args["gpt_number_text_tokens"] == 6681 == len(json.loads(vocab_json)["model"]["vocab"])
    assert (args["gpt_num_audio_tokens"], args["gpt_start_audio_token"], args["gpt_stop_audio_token"]) == (
        1026, 1024, 1025,
    )  # fmt: skip
    assert (args["gpt_max_text_tokens"], args["gpt_max_audio_tokens"]) == (402, 605)
    assert args["decoder_input_dim"] == 1024 and args["d_vector_dim"] == 512
    assert (config.temperature, config.top_k, config.top_p, config.repetition_penalty) == (0.75, 50, 0.85, 5.0)


def test_build_writes_the_config_of_its_size(tiny_checkpoint):
    config, _ = demo.config_for("tiny")
    written = json.loads((tiny_checkpoint / "config.json").read_text())
    assert written["model_args"] == json.loads(json.dumps(config.to_dict()["model_args"]))
    with pytest.raises(ValueError, match="size must be one of tiny, small, full"):
        demo.config_for("huge")


def test_missing_checkpoint_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotLoadedError, match=r"XTTS V2 model is not loaded: .* lacks model.pth, vocab.json"):
        loading.load(tmp_path, device="cpu")


def test_corrupt_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    for name in ("config.json", "vocab.json"):
        (tmp_path / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (tmp_path / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotLoadedError, match="XTTS V2 model is not loaded: loading .* failed"):
        loading.load(tmp_path, device="cpu")


def test_released_model_needs_the_license_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("TTS_HOME", str(tmp_path))
    monkeypatch.delenv("COQUI_TOS_AGREED", raising=False)
    with pytest.raises(ModelNotLoadedError, match="set COQUI_TOS_AGREED=1"):
        loading.load(None, model="xtts_v2", device="cpu")


def test_released_model_that_cannot_be_fetched_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TTS_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COQUI_TOS_AGREED", "1")
    with pytest.raises(ModelNotLoadedError, match="not on this machine and could not be fetched"):
        loading.load(None, model="xtts_v2", device="cpu")


def test_unknown_released_model_and_device_are_named():
    with pytest.raises(ModelNotLoadedError, match="XTTS_MODEL must be one of xtts_v2, got 'xtts_v9'"):
        loading.fetch_released("xtts_v9")
    with pytest.raises(ModelNotLoadedError, match="XTTS_DEVICE must be cuda, cpu or auto, got 'tpu'"):
        loading.resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(ModelNotLoadedError, match="no CUDA device is available"):
        loading.resolve_device("cuda")
