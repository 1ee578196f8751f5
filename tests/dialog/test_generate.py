"""Reply prompts, generation with causal and seq2seq models, LoRA (multi-task) fine-tuning."""

from __future__ import annotations

import threading

import pytest
import torch

from lmsmith.dialog.corpus import Passage
from lmsmith.dialog.generate import (
    NO_DOCS_LINE,
    TASK_LINES,
    DialogExample,
    _batch,
    chat_messages,
    dialog_prompt,
    generate_texts,
    load_generator,
    stream_text,
    train_generator,
    training_pairs,
)
from lmsmith.models import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_gen_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gen")
    tiny_causal_lm(vocab_size=100, seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _example() -> DialogExample:
    return DialogExample(
        current="And the fee?",
        history=[("agent", "Yes, online."), ("user", "Can I renew online?")],
        passages=[Passage("p1", "Renew // Renewals can be done online. The fee is $20.")],
        grounding="The fee is $20.",
        reply="It is $20.",
        target_grounding="The fee is $20.",
    )


def test_prompt_is_a_system_message_then_the_dialogue_as_chat_turns():
    m = chat_messages(_example())
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user"]
    system = m[0]["content"]
    assert system.startswith(TASK_LINES["reply"])
    assert "Documents:\n[1] Renew: Renewals can be done online." in system
    assert system.endswith("Answer sentence: The fee is $20.")
    # oldest turn first, the current turn last
    assert [x["content"] for x in m[1:]] == ["Can I renew online?", "Yes, online.", "And the fee?"]
    g = chat_messages(_example(), task="ground")
    assert "Answer sentence" not in g[0]["content"] and g[0]["content"].startswith(
        TASK_LINES["ground"]
    )
    bare = chat_messages(DialogExample("Hi?"))
    assert bare == [
        {"role": "system", "content": NO_DOCS_LINE},
        {"role": "user", "content": "Hi?"},
    ]
    assert "..." in chat_messages(_example(), passage_words=3)[0]["content"]
    assert len(chat_messages(_example(), max_history=1)) == 3
    with pytest.raises(ValueError, match="task"):
        chat_messages(_example(), task="summarise")


def test_dialog_prompt_uses_the_chat_template_when_there_is_one():
    tok = tiny_tokenizer()
    plain = dialog_prompt(_example(), tok)
    assert plain.startswith("System: ") and plain.endswith("User: And the fee?\n\nAssistant:")
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|bot|>"
    p = dialog_prompt(_example(), tok)
    assert p.startswith("<|system|>" + TASK_LINES["reply"]) and p.endswith("<|bot|>")
    assert "<|user|>Can I renew online?<|assistant|>Yes, online.<|user|>And the fee?" in p


def test_streamed_text_equals_the_batch_generation(tiny_gen_dir):
    model, tok, _ = load_generator(tiny_gen_dir)
    prompt = dialog_prompt(_example(), tok)
    pieces = list(stream_text(model, tok, prompt, max_new_tokens=8))
    assert "".join(pieces).strip() == generate_texts(model, tok, [prompt], max_new_tokens=8)[0]
    stop = threading.Event()
    stop.set()
    assert len("".join(stream_text(model, tok, prompt, 8, cancel=stop))) <= len("".join(pieces))


def test_batch_masks_prompt_and_padding():
    tok = tiny_tokenizer()
    ids, att, lab = _batch(tok, [("abc", "xy"), ("a", "z")], max_prompt=10, max_total=10)
    assert ids.shape == att.shape == lab.shape == (2, 6)  # 3 + 2 + eos
    assert lab[0].tolist()[:3] == [-100] * 3 and lab[0, 5] == tok.eos_token_id
    assert lab[1].tolist() == [-100, ids[1, 1].item(), tok.eos_token_id, -100, -100, -100]
    assert att[1].tolist() == [1, 1, 1, 0, 0, 0]


def test_multitask_doubles_the_pairs():
    tok = tiny_tokenizer()
    ex = [_example(), _example()]
    assert len(training_pairs(tok, ex, multitask=False)) == 2
    pairs = training_pairs(tok, ex, multitask=True)
    assert len(pairs) == 4 and pairs[-1][1] == "The fee is $20."
    assert TASK_LINES["ground"] in pairs[-1][0]


def test_lora_training_lowers_the_loss_and_merges_to_a_plain_model(tiny_gen_dir, tmp_path):
    model, tok, seq2seq = load_generator(tiny_gen_dir)
    assert not seq2seq
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged, s = train_generator(
        model, tok, [_example()], multitask=True, steps=30, batch_size=2, lr=1e-2, progress=False
    )
    # the tiny model's small LM head (std 0.02) bounds its logits, so the loss falls slowly
    assert s["n_pairs"] == 2 and s["mean_loss_last_10"] < s["mean_loss_first_10"] - 0.2
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(before)
    assert any(not torch.equal(before[k], v) for k, v in merged.state_dict().items())
    merged.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, _, _ = load_generator(str(tmp_path / "m"))
    prompt = dialog_prompt(_example(), tok)
    a = generate_texts(merged, tok, [prompt], max_new_tokens=8)
    b = generate_texts(again, tok, [prompt], max_new_tokens=8)
    assert a == b


def test_generation_does_not_depend_on_batching(tiny_gen_dir):
    model, tok, _ = load_generator(tiny_gen_dir)
    prompts = [dialog_prompt(_example(), tok), "User: hi\n\nAssistant:", "short"]
    one = [generate_texts(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=3) == one


def test_seq2seq_models_load_and_generate(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2, seq2seq = load_generator(str(tmp_path))
    assert seq2seq
    out = generate_texts(model, tok2, ["a b", "hello there"], max_new_tokens=5, seq2seq=True)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
