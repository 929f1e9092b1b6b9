"""The tiny model folder: deterministic, loadable, shaped as its config says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from throttllem._cli import main
from throttllem._engines.vllm.tiny_model import TinyModelSpec, write_tiny_model
from throttllem._errors import ConfigError

tokenizers = pytest.importorskip("tokenizers", reason="needs the tiny-model extra")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="needs the tiny-model extra")


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a", TinyModelSpec(seed=3))
    b = write_tiny_model(tmp_path / "b", TinyModelSpec(seed=3))
    c = write_tiny_model(tmp_path / "c", TinyModelSpec(seed=4))
    assert a["sha256"] == b["sha256"]
    assert set(a["sha256"]) == {"config.json", "generation_config.json", "model.safetensors",
                                "special_tokens_map.json", "tokenizer.json",
                                "tokenizer_config.json"}
    assert a["sha256"]["model.safetensors"] != c["sha256"]["model.safetensors"]


def test_weights_match_the_config_and_the_tokenizer_round_trips(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, TinyModelSpec())
    config = json.loads((tmp_path / "config.json").read_text())
    weights = safetensors_numpy.load_file(str(tmp_path / "model.safetensors"))
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    assert weights["model.embed_tokens.weight"].shape == (vocab, hidden)
    assert config["head_dim"] * config["num_attention_heads"] == hidden
    layers = {k.split(".")[2] for k in weights if k.startswith("model.layers.")}
    assert len(layers) == config["num_hidden_layers"]
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (
        config["num_key_value_heads"] * config["head_dim"], hidden)

    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == vocab
    text = "Write a haiku about the energy of a GPU clock, ünïcode 🙂 included."
    enc = tok.encode(text)
    assert enc.ids[0] == config["bos_token_id"]
    assert max(enc.ids) < vocab
    assert tok.decode(enc.ids) == text
    # Whole words are learned: ordinary English is far shorter in tokens than in bytes.
    assert len(tok.encode("please explain the model").ids) < len("please explain the model") / 2
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in tok_config["chat_template"]


@pytest.mark.parametrize(("field", "value"), [("heads", 8), ("hidden", 100), ("layers", 0),
                                              ("kv_heads", 3), ("vocab", 100)])
def test_shapes_no_engine_loads_are_refused(tmp_path: Path, field: str, value: int) -> None:
    spec = TinyModelSpec(**{field: value})
    with pytest.raises(ConfigError):
        write_tiny_model(tmp_path, spec)
    assert not (tmp_path / "model.safetensors").exists()


def test_cli_writes_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "tiny", "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["spec"]["seed"] == 1
    assert (tmp_path / "m" / "model.safetensors").stat().st_size > 0
