import pytest
import torch

from lmsmith.data import shared_data_dir


@pytest.mark.slow
def test_smollm2_shared_prompt_scoring_matches_full_sequence():
    """The real embedded model: chat prompts, the KV-cache path equals an uncached pass."""
    from lmsmith.data.bbq import load_bbq
    from lmsmith.debias.prompts import INSTRUCTIONS
    from lmsmith.debias.scoring import bbq_items, encode, option_logprobs, pad_id
    from lmsmith.models import load_lm

    data = shared_data_dir()
    if data is None or not (data / "bbq/Age.jsonl").exists():
        pytest.skip("../shared/data/bbq is not here")
    model, tok = load_lm("smollm2-135m-instruct")
    rows = load_bbq(data / "bbq/Age.jsonl", limit=1)
    items = bbq_items(rows, [INSTRUCTIONS[0], INSTRUCTIONS[4]], tok, chat=True)
    enc = [encode(tok, p, o, seq2seq=False, chat=True) for p, o in items]
    lp, _ = option_logprobs(model, enc, pad_id(tok))
    assert lp.shape == (2, 3) and torch.isfinite(lp).all()
    e = enc[1]
    for k in range(3):
        o = e.option_ids[k]
        with torch.no_grad():
            logits = model(torch.tensor([e.prompt_ids + o])).logits[0]
        ref = torch.log_softmax(logits, -1)
        p = len(e.prompt_ids)
        want = sum(ref[p - 1 + j, o[j]].item() for j in range(len(o)))
        assert lp[1, k].item() == pytest.approx(want, abs=2e-3)
