"""The chat loss mask (`next-token:roles=assistant`, preset `chat`) on real conversation folders.

Known answer: on a 2-turn conversation the loss is the mean cross-entropy of the assistant turn's
tokens alone, each predicted from the hidden state of the token before it (the user turn is
context: it shapes those hidden states but is never a target). Computed here by hand from the
model's own hidden states and tied output head.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmtool.data.batching import assemble
from mmtool.data.index import TokenIndex, role_code
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.models.model import ModelConfig, build_model
from mmtool.models.tasks import expand

CONVERSATIONS = [
    {"id": "two-turns", "messages": [{"role": "user", "content": "Hi! What is 2+2?"},
                                     {"role": "assistant", "content": "It is 4.\nEasy."}]},
    {"id": "three-turns", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Capital of France?"},
                                       {"role": "assistant", "content": "Paris."}]},
    {"id": "long", "messages": [{"role": "user", "content": "Count to five, please."},
                                {"role": "assistant", "content": "1 2 3 4 5"},
                                {"role": "user", "content": "And back?"},
                                {"role": "assistant", "content": "5 4 3 2 1"}]},
]


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> TokenIndex:
    root = tmp_path_factory.mktemp("chat")
    src = root / "chat.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    preprocess(PreprocessConfig(source="conversations", out=root / "data", options=[f"path={src}"],
                                tokenizers=["text=bytes"], overwrite=True))
    return TokenIndex([root / "data"])


def build(index, objectives, fusion="early"):
    torch.manual_seed(0)
    return build_model(ModelConfig(fusion=fusion, objectives=objectives), index.streams)


def sample_number(index, sid):
    return index.sample_ids(np.arange(len(index))).index(sid)


def test_chat_preset_is_next_token_on_assistant_text():
    assert expand("chat") == "next-token:modalities=text:roles=assistant"


def test_batch_carries_each_segments_role(chat):
    i = sample_number(chat, "three-turns")
    batch = assemble(chat, np.array([i]), "packed")
    assert batch.numpy("seg_role").tolist() == [role_code(r) for r in ("system", "user", "assistant")]


def test_loss_is_the_mean_over_assistant_tokens_only_known_answer(chat):
    """Hand computation on the 2-turn conversation: bytes of each turn wrapped in BOS/EOS."""
    m = build(chat, {"chat": 1.0})
    m.eval()
    i = sample_number(chat, "two-turns")
    batch = assemble(chat, np.array([i]), "packed")
    out = m(batch)
    user = [256, *"Hi! What is 2+2?".encode(), 257]
    assistant = [256, *"It is 4.\nEasy.".encode(), 257]
    k = chat.stream_ids["text:bytes"]
    assert batch.numpy(f"s{k}.ids").tolist() == user + assistant  # the sample, in order
    with torch.no_grad():
        hidden, view = m.hidden_states(batch)  # [N, d]
        idx = view.packed(batch[f"s{k}.slot"]).long()  # [n] packed place of each token
        logits = hidden[idx] @ m.embedder.encoders[str(k)].head_weight.T  # [n, V]
        target = torch.tensor(user + assistant)
        pos = torch.arange(len(user), len(user) + len(assistant))  # assistant tokens
        by_hand = F.cross_entropy(logits[pos - 1].float(), target[pos]).item()
        everything = F.cross_entropy(logits[:-1].float(), target[1:]).item()
    assert out.losses["chat"].item() == pytest.approx(by_hand, rel=1e-5)
    assert abs(by_hand - everything) > 1e-3  # the user turn would change it: the mask is real
    lm = build(chat, {"lm": 1.0})
    lm.load_state_dict(m.state_dict(), strict=False)
    lm.eval()
    assert lm(batch).losses["lm"].item() == pytest.approx(everything, rel=1e-5)


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_chat_mask_packed_equals_padded(chat, fusion):
    m = build(chat, {"chat": 1.0, "lm": 0.5}, fusion)
    samples = np.arange(len(chat))
    packed, padded = (assemble(chat, samples, layout) for layout in ("packed", "padded"))
    assert padded.num_slots > packed.num_slots
    a, b = m(packed), m(padded)
    for name in ("chat", "lm"):
        assert a.losses[name].item() == pytest.approx(b.losses[name].item(), abs=1e-5)
    assert torch.allclose(a.by_sample_loss, b.by_sample_loss, atol=1e-5)


def test_targets_are_exactly_the_assistant_tokens(chat):
    """The role mask selects every token of the assistant turns and nothing else; with zero heads
    every target costs ln V, so the chat loss is ln V whatever the mix of samples."""
    m = build(chat, {"chat": 1.0, "next-token:modalities=text:roles=system+user": 1.0})
    for enc in m.embedder.encoders.values():
        if hasattr(enc, "table"):
            torch.nn.init.zeros_(enc.table.weight)
    batch = assemble(chat, np.arange(len(chat)), "packed")
    assert m(batch).losses["chat"].item() == pytest.approx(np.log(258), abs=1e-4)
    k = chat.stream_ids["text:bytes"]
    turns = [t for c in CONVERSATIONS for t in c["messages"]]
    n_assistant = sum(len(t["content"].encode()) + 2 for t in turns if t["role"] == "assistant")
    n_other = sum(len(t["content"].encode()) + 2 for t in turns if t["role"] != "assistant")
    assert int(m.objectives["chat"]._has_role(batch, k).sum()) == n_assistant
    assert int(m.objectives["next-token"]._has_role(batch, k).sum()) == n_other
    assert n_assistant + n_other == batch.stream_tokens(k)


def test_roles_option_is_checked():
    from mmtool.models.objectives import build_objective
    from mmtool.data.index import Stream

    streams = [Stream("text:bytes", "text", "ids", vocab_size=258)]
    with pytest.raises(MMToolError, match="roles must be role names"):
        build_objective("next-token:roles=", streams, 8, 0.5)
    assert build_objective("next-token:roles=assistant+tool", streams, 8, 0.5).roles == ["assistant", "tool"]
