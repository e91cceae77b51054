"""Text-only samples longer than ``data.seq_length`` are truncated and kept (not skipped), with their
labels intact: the kept tokens and labels are the untruncated encoding's, every label still names the
next token in the packed sequence, and the last position (whose next token was cut) is unlabelled.
A sample whose truncation leaves no assistant token is skipped as ``truncated_no_labels``."""
from __future__ import annotations

import json

import torch

from tests.synthetic import tiny_input
from lvita.config.schema import DataConfig, SourceConfig
from lvita.data.formats import normalise_messages
from lvita.data.stream import DataStream
from lvita.data.template import IGNORE, encode_conversation
from lvita.data.tokenizer import load_tokenizer, special_token_ids

L = 64
LONG = {"id": "long", "messages": [{"role": "user", "content": "Count."},
                                   {"role": "assistant", "content": " ".join(str(i) for i in range(200))}]}
PROMPT_ONLY = {"id": "prompt", "messages": [{"role": "user", "content": " ".join(["words"] * 300)},
                                            {"role": "assistant", "content": "ok"}]}
SHORT = {"id": "short", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def test_long_text_sample_is_truncated_and_kept_with_its_labels(tmp_path, tokenizer_dir):
    t = load_tokenizer(tokenizer_dir)
    sp = special_token_ids(t)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (LONG, PROMPT_ONLY, SHORT)))
    cfg = DataConfig(root=str(tmp_path), seq_length=L, sources=[SourceConfig("t", ["t.jsonl"])], pack_buffer=1)
    stream = DataStream(cfg, tiny_input(t), global_batch=1, seed=0, log=lambda *a: None)
    full_ids, full_targets = encode_conversation(normalise_messages(LONG), t, sp, cfg.system_prompt, [])
    assert len(full_ids) > 2 * L

    seqs = [stream.next_sequence() for _ in range(3)]
    longs = [s for s in seqs if [m["id"] for m in s.samples] == ["long"]]
    assert longs, [[m["id"] for m in s.samples] for s in seqs]  # kept, alone in its sequence
    s = longs[0]
    assert s.samples[0]["start"] == 0 and s.samples[0]["end"] == L and s.pad == 0
    assert s.input_ids.tolist() == full_ids[:L]
    assert s.targets[:L - 1].tolist() == full_targets[:L - 1]  # labels intact
    assert s.targets[L - 1] == IGNORE  # its next token was cut off
    labelled = torch.nonzero(s.targets != IGNORE).flatten()
    assert len(labelled) > L // 3
    assert torch.equal(s.targets[labelled], s.input_ids[labelled + 1])  # each label is the next token
    assert s.samples[0]["labels"] == len(labelled)
    assert all("prompt" not in [m["id"] for m in q.samples] for q in seqs)
    assert stream.skipped == {"truncated_no_labels": 1}
