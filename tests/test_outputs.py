"""The output processor: incremental text equal to a whole decode, stop strings on new text only."""

import pytest

from helios.outputs import OutputProcessor
from helios.sampling_params import SamplingParams
from helios.sequence import Sequence
from tiny_models import build_tiny_tokenizer

TEXTS = ["Hello world, this is a test.", "Café crème, naïve façade — déjà vu!", "数学是科学的语言。",
         "Emoji: 🚀🌊 and 👩‍🔬 done.", "  leading spaces\n\nand blank lines\tend"]


@pytest.fixture(scope="module", params=["tiny", "default"])
def tokenizer(request, tmp_path_factory):
    if request.param == "tiny":
        return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return request.getfixturevalue("default_llm").tokenizer  # the session's default model (skips when absent)


def stream(tokenizer, ids, **params):
    """Feed `ids` one at a time as the engine does; return the deltas and the last output."""
    processor = OutputProcessor(tokenizer, eos_ids=set(), max_model_len=10_000)
    seq = Sequence("r", [1], SamplingParams(max_tokens=len(ids), **params))
    processor.add(seq)
    deltas, out = [], None
    for token in ids:
        out = processor.process(seq, token, 1, None)
        seq.output_ids.append(token)
        deltas.append(out.new_text)
        if out.finished:
            break
    return deltas, out


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_whole_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    deltas, out = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == out.text
    assert out.finished and out.finish_reason == "length" and out.token_ids == ids
    assert all("\ufffd" not in d for d in deltas)  # half characters are held back, never sent


@pytest.mark.parametrize("stop", ["END", "\n\n", "crème", "🌊"])
def test_stop_string_across_tokens_is_never_sent(tokenizer, stop):
    text = "Café crème and the sea 🌊 went on.\n\nEND of it all"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    deltas, out = stream(tokenizer, ids, stop=[stop, "never appears"])
    assert out.finish_reason == "stop"
    assert "".join(deltas) == out.text == text[:text.index(stop)]
    assert not any(stop in d for d in deltas)


def test_one_delta_per_token_carries_only_the_new_token(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False).input_ids
    processor = OutputProcessor(tokenizer, eos_ids=set(), max_model_len=10_000)
    seq = Sequence("r", [1], SamplingParams(max_tokens=100))
    processor.add(seq)
    for count, token in enumerate(ids, 1):
        out = processor.process(seq, token, 3, None)
        seq.output_ids.append(token)
        assert out.new_token_ids == [token] and out.new_exit_layers == [3] and out.num_output_tokens == count
        assert out.token_ids is None and not out.finished  # no history copied before the end
