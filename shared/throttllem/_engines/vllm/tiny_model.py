"""A tiny random-weight Llama model and a locally trained tokenizer, written into a folder that
vLLM (or transformers) loads as it loads any Hugging Face model.

Why: CI, the demo and every developer need a real model server without a download (no model
hub is reachable). The weights are random, so the text is gibberish, but the engine does real
work: real prefill and decode passes, a real paged KV cache, real token streams. The shape is
the smallest that vLLM's CPU attention accepts (head size 64).

``throttllem model tiny --out DIR [--seed N]`` writes config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json and special_tokens_map.json; the same
seed and options give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from throttllem._errors import ConfigError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)

# A role-tagged template; BOS is written by the template (vLLM tokenizes a rendered chat
# without adding special tokens again).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# The words of the built-in training corpus: everyday English plus serving vocabulary, so that
# ordinary prompts become a few tokens per word rather than one per byte.
_WORD_TEXT = """
the a an and or but if then else when while of to in on at by for with from into over under
about after before between through during without within is are was were be been being have
has had do does did will would can could should may might must shall not no yes all any each
every some many much more most few less least other another such same own only just also very
too so than as there here where what which who whom whose why how this that these those it its
i you he she we they me him her us them my your his our their one two three four five six seven
eight nine ten hundred thousand first second third last next new old good bad great small large
long short high low big little early late young right left best better worse hot cold fast slow
time day night week month year today tomorrow yesterday morning evening hour minute second world
people person man woman child family friend life work home house city country water food air fire
earth light sound word name story book page line letter number point part place case fact way
thing problem question answer idea reason result example system program computer data model
energy power clock frequency latency token request server client engine batch queue cache memory
write read make take give find think know want need use try ask tell say show help call keep let
begin end start stop run walk talk speak listen learn teach explain describe list summarize
translate compare create build design plan test check measure count add remove change move turn
please thank hello sorry again always never often sometimes usually quickly slowly carefully
poem haiku essay email recipe code function class method error bug fix python rust java text
"""
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """The model's shape. Defaults: two layers, hidden 128, two query heads of 64 sharing one KV
    head, float32 (bfloat16 kernels are slow or missing on many CPUs)."""

    layers: int = 2
    hidden: int = 128
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 256
    vocab: int = 1024
    context: int = 4096
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def check(self) -> None:
        """Clear errors for shapes no engine would load."""
        if min(self.layers, self.hidden, self.heads, self.kv_heads, self.intermediate) <= 0:
            raise ConfigError(f"every size of the tiny model must be positive: {self}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads {self.heads} is not a multiple of kv heads {self.kv_heads}")
        if self.head_dim % 32:
            raise ConfigError(f"head size {self.head_dim} (hidden / heads) must be a multiple of "
                              "32: vLLM's CPU attention refuses smaller or odd head sizes")
        if self.vocab < 256 + len(SPECIAL_TOKENS) + 1:
            raise ConfigError(f"vocab {self.vocab} must exceed the 256 byte tokens and "
                              f"{len(SPECIAL_TOKENS)} special tokens")
        if self.context < 16:
            raise ConfigError(f"context {self.context} is too short to serve anything")


def training_corpus(seed: int, sentences: int = 4000) -> list[str]:
    """Sentences of built-in words in a seeded random order (the BPE learns whole words)."""
    rng = np.random.default_rng(seed)
    words = np.asarray(_WORDS)
    lengths = rng.integers(4, 16, size=sentences)
    out = []
    for n in lengths:
        text = " ".join(words[rng.integers(0, len(words), size=int(n))])
        out.append(text[0].upper() + text[1:] + rng.choice([".", "?", "!", ","]))
    out.extend(words)  # every word at least once on its own
    return out


def train_tokenizer(spec: TinyModelSpec) -> Any:
    """A byte-level BPE (any text encodes, nothing is unknown) with BOS added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tokenizer.train_from_iterator(training_corpus(spec.seed), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def random_weights(spec: TinyModelSpec, vocab: int) -> dict[str, np.ndarray]:
    """Llama weights named as transformers names them, normal(0, 0.02), norms at one; the
    embedding is tied to the output head."""
    rng = np.random.default_rng(spec.seed)
    h, hd, inter = spec.hidden, spec.head_dim, spec.intermediate

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(spec.heads * hd, h)
        tensors[p + "self_attn.k_proj.weight"] = normal(spec.kv_heads * hd, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(spec.kv_heads * hd, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, spec.heads * hd)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, h)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, h)
        tensors[p + "mlp.down_proj.weight"] = normal(h, inter)
        tensors[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
    tensors["model.norm.weight"] = np.ones(h, dtype=np.float32)
    return tensors


def write_tiny_model(out: Path, spec: TinyModelSpec = TinyModelSpec()) -> dict[str, Any]:
    """Write the model folder; returns a summary (sizes, token ids, file digests)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    spec.check()
    tokenizer = train_tokenizer(spec)
    vocab = tokenizer.get_vocab_size()
    if vocab > spec.vocab:  # pragma: no cover - the trainer never exceeds its target
        raise ConfigError(f"tokenizer vocab {vocab} exceeds the model's {spec.vocab}")
    ids = {name: tokenizer.token_to_id(tok) for name, tok in
           (("bos_token_id", BOS), ("eos_token_id", EOS), ("pad_token_id", PAD))}
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "vocab_size": vocab,
        "dtype": "float32",
        "torch_dtype": "float32",
        **ids,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": spec.context,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": list(ROLE_TOKENS),
    }
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
               "additional_special_tokens": list(ROLE_TOKENS)}
    generation = {**ids, "max_length": spec.context}
    for name, body in (("config.json", config), ("tokenizer_config.json", tokenizer_config),
                       ("special_tokens_map.json", special),
                       ("generation_config.json", generation)):
        (out / name).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n")
    save_file(random_weights(spec, vocab), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    files = sorted(p for p in out.iterdir() if p.is_file())
    return {
        "out": str(out),
        "spec": asdict(spec),
        "vocab": vocab,
        **ids,
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in files},
    }


# --------------------------------------------------------------------------- CLI


def add_model_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``model tiny`` on the main CLI."""
    model: argparse.ArgumentParser = sub.add_parser(
        "model", help="write servable models (no download needed)")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL")
    p: argparse.ArgumentParser = model_sub.add_parser(
        "tiny", help="a tiny random-weight Llama model and a locally trained tokenizer",
        description="Write a tiny random-weight Llama-architecture model (safetensors) and a "
        "byte-level BPE tokenizer trained on a built-in corpus into --out; vLLM serves it with "
        "`python -m vllm.entrypoints.openai.api_server --model DIR`. Deterministic per --seed.")
    d = TinyModelSpec()
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--vocab", type=int, default=d.vocab, help="tokenizer vocabulary target")
    p.add_argument("--context", type=int, default=d.context, help="max positions (tokens)")
    p.set_defaults(func=_run_tiny)
    return p


def _run_tiny(args: argparse.Namespace) -> int:
    spec = TinyModelSpec(layers=args.layers, hidden=args.hidden, heads=args.heads,
                         kv_heads=args.kv_heads, intermediate=args.intermediate,
                         vocab=args.vocab, context=args.context, seed=args.seed)
    print(json.dumps(write_tiny_model(args.out, spec), indent=2))
    return 0
