"""Early exit: unreachable thresholds change nothing, KV fill equals a slow reference,
prefix loads equal the truncated model, head files round-trip or fail clearly."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from helios import LLM, LLMEngine, EngineConfig, SamplingParams
from helios.exits import ExitHead, ExitHeadError, load_exit_heads, save_exit_heads

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], list(range(40, 60)), [100, 101, 102, 7]]


def run_all(engine: LLMEngine, prompts, params=GREEDY):
    """Run to completion; return outputs and each request's K/V [layers, positions, heads, dim]
    as they were when its blocks were last freed (later requests may reuse the blocks)."""
    tables, free = {}, engine.blocks.free

    def keep_kv(seq):
        runner, table = engine.runner, list(seq.block_table)
        k, v = runner.k_cache[:, table].flatten(1, 2), runner.v_cache[:, table].flatten(1, 2)
        tables[seq.request_id] = (k.clone(), v.clone())
        free(seq)

    engine.blocks.free = keep_kv
    for i, p in enumerate(prompts):
        engine.add_request(p, params, str(i))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[str(i)] for i in range(len(prompts))], [tables[str(i)] for i in range(len(prompts))]


def slow_reference(hf, prompt, tokens, exit_layers):
    """Token by token with transformers' modules: the row that makes output j runs exit_layers[j]
    layers; every later layer gets K/V from its frozen hidden state (CALM's state copy)."""
    inner, cfg = hf.model, hf.config
    num_heads, num_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ids = prompt + tokens
    keys = [[] for _ in inner.layers]
    values = [[] for _ in inner.layers]
    predicted = []
    with torch.no_grad():
        for pos in range(len(ids) - 1):
            out_index = pos - len(prompt) + 1
            stop = exit_layers[out_index] if out_index >= 0 else len(inner.layers)
            h = inner.embed_tokens(torch.tensor([[ids[pos]]]))
            cos, sin = inner.rotary_emb(h, torch.tensor([[pos]]))
            for index, layer in enumerate(inner.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(1, 1, num_heads, head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, 1, num_kv, head_dim).transpose(1, 2)
                v = attn.v_proj(x).view(1, 1, num_kv, head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                keys[index].append(k[0, :, 0])
                values[index].append(v[0, :, 0])
                if index >= stop:
                    continue  # exited: K/V filled from the frozen state, nothing else runs
                K = torch.stack(keys[index], 1).repeat_interleave(num_heads // num_kv, 0)
                V = torch.stack(values[index], 1).repeat_interleave(num_heads // num_kv, 0)
                scores = (q[0, :, 0, None, :] @ K.transpose(1, 2))[:, 0] / head_dim ** 0.5
                o = (torch.softmax(scores, -1)[:, None, :] @ V)[:, 0].reshape(1, 1, -1)
                h = h + attn.o_proj(o)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            if out_index >= 0:
                predicted.append(int(hf.lm_head(inner.norm(h)).argmax()))
    return predicted, keys, values


@pytest.mark.parametrize("policy", ["batch", "token"])
@pytest.mark.parametrize("confidence", ["max_prob", "margin", "saturation"])
def test_unreachable_threshold_equals_full_depth(tiny_model_dir, policy, confidence):
    folder, _ = tiny_model_dir("llama")
    full = LLM(str(folder), kv_cache_memory=1 << 20).generate(PROMPTS, GREEDY)
    early = LLM(str(folder), kv_cache_memory=1 << 20, exit_policy=policy, exit_layers=[1, 2, 3],
                exit_threshold=1.01, confidence=confidence).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in early] == [o.token_ids for o in full]
    assert all(layer == 4 for o in early for layer in o.exit_layers)


def test_zero_threshold_exits_everything_at_the_first_exit(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    outs = LLM(str(folder), kv_cache_memory=1 << 20, exit_policy="token", exit_layers=[2, 3],
               exit_threshold=0.0).generate(PROMPTS, GREEDY)
    assert all(layer == 2 for o in outs for layer in o.exit_layers)


@pytest.mark.parametrize("policy", ["batch", "token"])
def test_kv_fill_equals_slow_reference(tiny_model_dir, policy):
    folder, hf = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20, exit_policy=policy,
                                    exit_layers=[1, 2, 3], exit_profile={1: 0.3, 2: 0.3, 3: 0.2, 4: 0.2}))
    outs, tables = run_all(engine, PROMPTS)
    layers_seen = {layer for o in outs for layer in o.exit_layers}
    assert len(layers_seen) >= (3 if policy == "token" else 2)  # exits really happened, at several depths
    assert_matches_reference(hf, PROMPTS, outs, tables)


def test_kv_fill_with_rows_in_several_attention_groups(tiny_model_dir):
    """36 decode rows of mixed context attend in 2 length groups; under `token` each layer's
    running rows are a subset of both groups."""
    folder, hf = tiny_model_dir("llama")
    prompts = [[(5 * i + j) % 120 + 1 for j in range(2 + (i * 11) % 30)] for i in range(36)]
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20, exit_policy="token", block_size=4,
                                    exit_layers=[1, 2, 3], exit_profile={1: 0.3, 2: 0.3, 3: 0.2, 4: 0.2}))
    outs, tables = run_all(engine, prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len({layer for o in outs for layer in o.exit_layers}) == 4
    assert_matches_reference(hf, prompts, outs, tables)


def assert_matches_reference(hf, prompts, outs, tables):
    """Tokens and every cached K/V equal the slow reference under the recorded exits."""
    for prompt, out, (k, v) in zip(prompts, outs, tables):
        predicted, keys, values = slow_reference(hf, prompt, out.token_ids, out.exit_layers)
        assert predicted == out.token_ids
        n = len(prompt) + len(out.token_ids) - 1  # the last token is never fed back
        for layer in range(4):
            torch.testing.assert_close(k[layer, :n], torch.stack(keys[layer]), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v[layer, :n], torch.stack(values[layer]), rtol=1e-4, atol=1e-5)


def test_batch_policy_leaves_together(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20, exit_policy="batch",
                                    exit_layers=[1, 2, 3], exit_profile={1: 0.5, 2: 0.2, 4: 0.3}))
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, str(i))
    while engine.has_unfinished():
        outs = engine.step()
        decode_layers = {o.new_exit_layers[-1] for o in outs if o.num_output_tokens > 1}
        assert len(decode_layers) <= 1  # every decode row of a step exits at one layer


def test_exits_replay_after_preemption(tiny_model_dir):
    """A preempted sequence is recomputed with its recorded exits, so its K/V and tokens stay
    those of its own run: each output equals the slow reference under its recorded exits."""
    folder, hf = tiny_model_dir("llama")
    per_token = 2 * 4 * 2 * 16 * 4  # K and V, 4 layers, 2 kv heads of 16 dims, float32
    tight = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=per_token * 32, block_size=4,
                                   exit_policy="token", exit_layers=[1, 2, 3],
                                   exit_profile={1: 0.4, 2: 0.3, 4: 0.3}))
    outs, tables = run_all(tight, PROMPTS)
    assert tight.stats.preemptions > 0
    assert_matches_reference(hf, PROMPTS, outs, tables)


def test_prefix_load_equals_truncated_model(tiny_model_dir):
    folder, _ = tiny_model_dir("llama")
    truncated = AutoModelForCausalLM.from_pretrained(folder, num_hidden_layers=2).eval()
    llm = LLM(str(folder), kv_cache_memory=1 << 20, max_layers=2)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        ref = truncated.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
        assert out.exit_layers == [2] * 10
    assert llm.engine.stats.confidence_breaches == 10 * len(PROMPTS)
    assert len(llm.engine.model.layers) == 2


def make_heads(hidden=64, rank=8):
    torch.manual_seed(1)
    return [ExitHead(layer=l, threshold=0.5 + 0.1 * l, norm=torch.ones(hidden) * 1.1,
                     adapter_down=torch.randn(rank, hidden) * 0.1, adapter_up=torch.randn(hidden, rank) * 0.1,
                     classifier_weight=torch.randn(hidden), classifier_bias=torch.zeros(1)) for l in (1, 2, 3)]


def test_head_files_round_trip_and_drive_the_engine(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20))
    heads = make_heads()
    save_exit_heads(tmp_path, heads, hidden_size=64, vocab_size=128, num_layers=4, confidence="classifier")
    loaded, meta = load_exit_heads(tmp_path, engine.model)
    assert meta["confidence"] == "classifier"
    for a, b in zip(heads, loaded):
        assert a.layer == b.layer and a.threshold == pytest.approx(b.threshold)
        torch.testing.assert_close(a.adapter_down, b.adapter_down)
        torch.testing.assert_close(a.classifier_weight, b.classifier_weight)
    outs = LLM(str(folder), kv_cache_memory=1 << 20, exit_policy="token", exit_heads=str(tmp_path),
               confidence="classifier").generate(PROMPTS, GREEDY)
    assert all(1 <= layer <= 4 for o in outs for layer in o.exit_layers)


def test_head_file_errors_are_clear(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=1 << 20))
    with pytest.raises(ExitHeadError, match="missing"):
        load_exit_heads(tmp_path / "nothing", engine.model)
    save_exit_heads(tmp_path / "other", make_heads(hidden=32), hidden_size=32, vocab_size=128, num_layers=4)
    with pytest.raises(ExitHeadError, match="another model"):
        load_exit_heads(tmp_path / "other", engine.model)
    save_exit_heads(tmp_path / "bad", make_heads(), hidden_size=64, vocab_size=128, num_layers=4)
    (tmp_path / "bad" / "exit_heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExitHeadError, match="corrupt"):
        load_exit_heads(tmp_path / "bad", engine.model)
