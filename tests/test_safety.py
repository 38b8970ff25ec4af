"""safety.py: weights come from safetensors files, never from pickles, unless the user says so."""

from __future__ import annotations

import shutil

from conftest import check_outcome

from qlora_lab import adapters


def test_pickle_adapters_load_only_when_allowed(tmp_path, trained_run):
    import torch
    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    torch.save(weights, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    check_outcome(lambda: adapters.resolve_adapter(str(adapter)), tmp_path, ["--allow-pickle"])
    ref = adapters.resolve_adapter(str(adapter), allow_pickle=True)
    assert ref.allow_pickle
