"""Tensors read back from safetensors files in place: found only where the file holds exactly their bytes."""

import torch
from safetensors.torch import save_file

from sacpo.models.load import load_model, model_files
from sacpo.models.weights_file import file_source, read_into


def _params(model):
    return {n: p for n, p in model.named_parameters()}


def test_a_models_weights_are_found_in_its_files_and_read_back_in_place(tiny_model):
    model = load_model(tiny_model)
    params = _params(model)
    source = file_source(model_files(tiny_model)[1], params)
    assert source is not None and set(source) == set(params)
    before = {n: p.detach().clone() for n, p in params.items()}
    storage = {n: p.data_ptr() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    read_into(source, params)
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    assert {n: p.data_ptr() for n, p in params.items()} == storage  # the same tensors, overwritten


def test_no_source_unless_every_tensor_is_stored_with_its_bytes(tiny_model, tmp_path):
    files = model_files(tiny_model)[1]
    model = load_model(tiny_model)
    params = _params(model)
    name = next(iter(params))
    with torch.no_grad():
        params[name].view(-1)[0] += 1e-3  # one element differs from the file
    assert file_source(files, params) is None
    assert file_source(files, {**_params(load_model(tiny_model)), "extra.weight": torch.zeros(2)}) is None
    halves = {n: p.detach().half() for n, p in _params(load_model(tiny_model)).items()}
    assert file_source(files, halves) is None  # another dtype than stored
    # another file with the same names: found there
    other = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, other)
    tensors = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    assert file_source([other], tensors) is None  # a's bytes differ
    tensors["a"] = torch.arange(6.0).reshape(2, 3)
    source = file_source([other], tensors)
    tensors["a"].zero_()
    read_into(source, tensors)
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3))
