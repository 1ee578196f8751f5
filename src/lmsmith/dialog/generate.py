"""Reply generation conditioned on the dialogue and the grounded passages; LoRA fine-tuning.

Prompts are chat messages, the way instruction-tuned models were tuned (rendered with the
tokenizer's chat template; models without one get a plain ``System:/User:/Assistant:`` text):

- **system**: the task (answer from the documents only, briefly; say so when they do not
  answer), the documents ``[i] title: body`` (first ``passage_words`` words of each), and,
  when a grounder found one, the sentence that answers (``Answer sentence: ...``);
- then the dialogue as chat turns, oldest first (``max_history`` earlier turns, user turns as
  ``user``, agent turns as ``assistant``), the current user turn last.

Two tasks share the format and differ in the system message's task line: ``reply`` (target:
the agent's reply) and ``ground`` (target: the grounding sentence, copied from the documents).
Multi-task training mixes both in one model, as Jang et al.'s system does.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq

log = logging.getLogger(__name__)

TASK_LINES = {
    "reply": "You answer questions using only the documents below. Reply to the user's last "
    "message in one or two short sentences, keeping the documents' exact figures and names. "
    "If the documents do not answer it, say that they do not.",
    "ground": "Copy, word for word, the sentence of the documents below that answers the "
    "user's last message.",
}
NO_DOCS_LINE = "Reply to the user's last message in one or two short sentences."


@dataclass
class DialogExample:
    """One turn to answer: the dialogue so far, passages, and the targets when known."""

    current: str
    history: list[tuple[str, str]] = field(default_factory=list)  # most recent first
    passages: list = field(default_factory=list)  # objects with .text (best first)
    grounding: str = ""  # span put in the reply prompt
    reply: str = ""  # target reply (training)
    target_grounding: str = ""  # target span (training, task "ground")


def _clip_words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def chat_messages(
    ex: DialogExample, task: str = "reply", passage_words: int = 120, max_history: int = 4
) -> list[dict]:
    """The prompt as chat messages: a system message, then the dialogue (oldest first)."""
    if task not in TASK_LINES:
        raise ValueError(f"task must be one of {list(TASK_LINES)}, got {task!r}")
    system = [TASK_LINES[task] if ex.passages or task == "ground" else NO_DOCS_LINE]
    if ex.passages:
        docs = []
        for i, p in enumerate(ex.passages, start=1):
            title, sep, body = p.text.partition(" // ")
            text = f"{title}: {body}" if sep else p.text
            docs.append(f"[{i}] {_clip_words(text, passage_words)}")
        system.append("Documents:\n" + "\n".join(docs))
    if ex.grounding and task == "reply":
        system.append(f"Answer sentence: {ex.grounding.strip()}")
    messages = [{"role": "system", "content": "\n\n".join(system)}]
    for role, text in reversed(ex.history[:max_history]):
        messages.append(
            {"role": "user" if role == "user" else "assistant", "content": text.strip()}
        )
    messages.append({"role": "user", "content": ex.current.strip()})
    return messages


def render_chat(messages: list[dict], tokenizer) -> str:
    """The text the model continues: the chat template with the assistant's turn opened, or
    plain ``Role: text`` lines ending in ``Assistant:`` when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"


def dialog_prompt(ex: DialogExample, tokenizer, task: str = "reply", **kw) -> str:
    """:func:`chat_messages` rendered by :func:`render_chat`."""
    return render_chat(chat_messages(ex, task, **kw), tokenizer)


def load_generator(spec: str):
    """(model, tokenizer, is_seq2seq): a causal LM by default; encoder-decoders load too."""
    from lmsmith.models import load_causal_or_seq2seq

    return load_causal_or_seq2seq(spec)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 4,
    max_prompt_tokens: int = 1024,
    seq2seq: bool = False,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (causal: left padding, prompt cut to its last
    ``max_prompt_tokens`` tokens; seq2seq: the encoder reads the prompt)."""
    from lmsmith.generation import generate

    if not seq2seq:
        return generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            greedy=True,
            batch_size=batch_size,
            max_prompt_tokens=max_prompt_tokens,
            progress=progress,
        )
    out: list[str] = []
    dev = next(model.parameters()).device
    for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate"):
        enc = tokenizer(
            prompts[i : i + batch_size],
            truncation=True,
            max_length=max_prompt_tokens,
            padding=True,
            return_tensors="pt",
        ).to(dev)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


# --------------------------------------------------------------------------- training


def training_pairs(
    tokenizer, examples: list[DialogExample], multitask: bool, **prompt_kw
) -> list[tuple[str, str]]:
    """(prompt, target) pairs: every reply; with ``multitask`` also every grounding span."""
    pairs = [(dialog_prompt(x, tokenizer, "reply", **prompt_kw), x.reply) for x in examples]
    if multitask:
        pairs += [
            (dialog_prompt(x, tokenizer, "ground", **prompt_kw), x.target_grounding)
            for x in examples
            if x.target_grounding.strip()
        ]
    return pairs


def _batch(tokenizer, pairs, max_prompt: int, max_total: int):
    """Right-padded causal batch, labels -100 on prompt and padding. Shapes (B, T)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    seqs, labels = [], []
    for p, y in pairs:
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt:]
        y_ids = (tokenizer(y, add_special_tokens=False)["input_ids"] + eos)[
            : max(1, max_total - len(p_ids))
        ]
        seqs.append(p_ids + y_ids)
        labels.append([-100] * len(p_ids) + y_ids)
    feats = [{"input_ids": s, "labels": lb} for s, lb in zip(seqs, labels)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # the collator pads ids and labels on the tokenizer's side
    try:
        b = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")(feats)
    finally:
        tokenizer.padding_side = side
    return b["input_ids"], b["attention_mask"], b["labels"]


def lora_wrap(model, rank: int = 16, alpha: int = 32, dropout: float = 0.05):
    """A peft LoRA wrapper on the attention and MLP projections (whatever exists)."""
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wanted = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    targets = [n for n in wanted if n in names] or "all-linear"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    return get_peft_model(model, cfg)


def train_generator(
    model,
    tokenizer,
    examples: list[DialogExample],
    multitask: bool = False,
    steps: int = 40,
    batch_size: int = 4,
    lr: float = 2e-4,
    lora_rank: int = 16,
    max_prompt_tokens: int = 768,
    max_total_tokens: int = 896,
    seed: int = 0,
    progress: bool = True,
    sink=None,
    prompt_kw: dict | None = None,
    gradient_checkpointing: bool = True,
):
    """LoRA fine-tuning of a causal LM on replies (and grounding spans when ``multitask``).

    Returns (merged plain model, summary). The LoRA weights are merged so the output is an
    ordinary Hugging Face checkpoint.
    """
    pairs = training_pairs(tokenizer, examples, multitask, **(prompt_kw or {}))
    if not pairs:
        raise ValueError("train_generator needs at least one example")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        # recompute activations in the backward pass: a 135M LM on 4 x 640 tokens otherwise
        # needs > 11 GB, mostly activations (LoRA's own state is small)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = lora_wrap(model, rank=lora_rank, alpha=2 * lora_rank)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    dev = next(peft_model.parameters()).device
    order: list[int] = []
    losses, t0 = [], time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc="train generator", disable=not progress):
        if len(order) < batch_size:
            more = list(range(len(pairs)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        ids, att, lab = _batch(
            tokenizer, [pairs[i] for i in idx], max_prompt_tokens, max_total_tokens
        )
        loss = peft_model(
            input_ids=ids.to(dev), attention_mask=att.to(dev), labels=lab.to(dev)
        ).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if sink is not None:
            sink.log(step=step, loss=losses[-1], lr=sched.get_last_lr()[0])
    merged = peft_model.merge_and_unload().eval()
    summary = {
        "steps": steps,
        "n_pairs": len(pairs),
        "n_examples": len(examples),
        "multitask": multitask,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "mean_loss_first_10": sum(losses[:10]) / len(losses[:10]),
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "train_time_s": round(time.perf_counter() - t0, 2),
    }
    return merged, summary


def stream_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    max_prompt_tokens: int = 1024,
    cancel=None,
):
    """Greedy continuation of one prompt, yielded piece by piece as tokens are decoded.

    ``model.generate`` runs in a helper thread and hands text to a transformers
    ``TextIteratorStreamer`` (which holds back partial words and multi-byte characters);
    ``cancel`` (a ``threading.Event``) stops generation at the next token. The pieces joined
    and stripped equal :func:`generate_texts` on the same prompt (one prompt, no padding).
    """
    import threading

    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from lmsmith.data.instruct import tokenize_prompt

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return cancel is not None and cancel.is_set()

    dev = next(model.parameters()).device
    ids = torch.tensor([tokenize_prompt(tokenizer, prompt, max_prompt_tokens)[0]], device=dev)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_Cancelled()]),
    )
    errors: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)
            streamer.end()

    t = threading.Thread(target=work, name="lmsmith-generate", daemon=True)
    t.start()
    first = True
    for piece in streamer:
        if first:
            piece = piece.lstrip()
            first = not piece
        if piece:
            yield piece
    t.join()
    if errors:
        raise errors[0]
