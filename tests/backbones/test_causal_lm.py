"""causal_lm on tiny random Qwen2 / LLaMA: response log-probabilities against an unpadded forward of each row,
soft-token prefixes, the reference (adapter off), chunking, tokenization and errors."""

import pytest
import torch

from plrm.backbones.causal_lm import CausalLMBackbone, left_pad, select_rows, token_logprobs
from plrm.backbones.models import BackboneError
from plrm.data.datamodule import PreparedData
from plrm.data.files import PreferenceFiles


def _prepared(length_pairs, **config):
    data = PreferenceFiles(PreferenceFiles.Config(path=str(length_pairs))).load()
    return PreparedData(data, CausalLMBackbone(CausalLMBackbone.Config(**config)))


def _manual_logprobs(model, items, prefix=None):
    """Per row, unpadded: log softmax of the logits at each response position, gathered at the next id."""
    out = []
    starts = torch.cumsum(items["lengths"], 0) - items["lengths"]
    for i in range(len(items["lengths"])):
        ids = items["ids"][starts[i]:starts[i] + items["lengths"][i]].unsqueeze(0)
        if prefix is None:
            logits = model(input_ids=ids).logits[0]
            offset = 0
        else:
            embeds = torch.cat([prefix[i:i + 1], model.get_input_embeddings()(ids)], 1)
            logits = model(inputs_embeds=embeds).logits[0]
            offset = prefix.shape[1]
        logp = torch.log_softmax(logits.float(), -1)
        p = int(items["prompt_lengths"][i])
        out.append(torch.stack([logp[offset + t - 1, ids[0, t]] for t in range(p, ids.shape[1])]))
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_response_logprobs_equal_an_unpadded_forward_of_each_row(length_pairs, arch):
    prepared = _prepared(length_pairs, model=f"tiny-random:{arch}", finetune="frozen", dtype="float32")
    lm = prepared.backbone.encoder().eval()
    items = prepared.backbone.inputs(torch.arange(12))
    with torch.no_grad():
        logps, mask = lm.response_logprobs(items)
        expected = _manual_logprobs(lm.model, items)
    assert mask.sum(1).tolist() == [len(e) for e in expected]
    for row, e in enumerate(expected):  # left-aligned: response token t in column t
        torch.testing.assert_close(logps[row, :len(e)], e, atol=1e-5, rtol=1e-5)
        assert (logps[row, len(e):] == 0).all()
    torch.testing.assert_close(lm(items)[:, 0], torch.stack([e.sum() for e in expected]), atol=1e-4, rtol=1e-5)


def test_a_soft_token_prefix_equals_inputs_embeds_in_front_of_each_row(length_pairs):
    prepared = _prepared(length_pairs, model="tiny-random:qwen2", finetune="frozen", dtype="float32")
    lm = prepared.backbone.encoder().eval()
    items = prepared.backbone.inputs(torch.arange(6))
    prefix = torch.randn(6, 3, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logps, _ = lm.response_logprobs(items, prefix)
        expected = _manual_logprobs(lm.model, items, prefix)
    for row, e in enumerate(expected):
        torch.testing.assert_close(logps[row, :len(e)], e, atol=1e-5, rtol=1e-5)


def test_reference_is_the_base_model_with_the_adapter_off(length_pairs):
    prepared = _prepared(length_pairs, model="tiny-random:llama", dtype="float32", lora_dropout=0.0)
    lm = prepared.backbone.encoder().eval()
    base = prepared.backbone.load_base().eval()
    items = prepared.backbone.inputs(torch.arange(5))
    with torch.no_grad():
        for name, p in lm.model.named_parameters():  # a trained adapter: B != 0
            if "lora_B" in name:
                p.normal_(0, 0.5)
        adapted = lm.sequence_logprob(items)
        with lm.reference():
            reference = lm.sequence_logprob(items)
        plain = torch.stack([e.sum() for e in _manual_logprobs(base, items)])
    torch.testing.assert_close(reference, plain, atol=1e-4, rtol=1e-5)
    assert (adapted - reference).abs().min() > 1e-3


def test_no_grad_scoring_in_chunks_equals_one_batch(length_pairs):
    prepared = _prepared(length_pairs, model="tiny-random:qwen2", finetune="frozen", dtype="float32",
                         inference_batch_size=4)
    lm = prepared.backbone.encoder().eval()
    items = prepared.backbone.inputs(torch.arange(11))
    prefix = torch.randn(11, 2, lm.hidden_size)
    with torch.no_grad():
        chunked = lm.response_logprobs(items, prefix)
    whole = lm.response_logprobs(items, prefix)  # gradients on: one batch
    torch.testing.assert_close(chunked[0], whole[0].detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked[1], whole[1])


def test_tokens_end_with_eos_and_prompt_lengths_mark_the_response(length_pairs):
    prepared = _prepared(length_pairs, model="tiny-random:qwen2")
    tok = prepared.backbone.tokenizer()
    items = prepared.backbone.inputs(torch.arange(3))
    starts = torch.cumsum(items["lengths"], 0) - items["lengths"]
    for i in range(3):
        ids = items["ids"][starts[i]:starts[i] + items["lengths"][i]].tolist()
        p = int(items["prompt_lengths"][i])
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:p]).endswith("<|assistant|>\n")  # the chat template's generation prompt
        assert not tok.decode(ids[p:-1]).startswith("<|")
    no_eos = _prepared(length_pairs, model="tiny-random:qwen2", append_eos=False).backbone.inputs(torch.arange(3))
    assert torch.equal(no_eos["lengths"], items["lengths"] - 1)


def test_left_pad_and_token_logprobs():
    ids, mask = left_pad({"ids": torch.tensor([5, 6, 7, 8, 9]), "lengths": torch.tensor([2, 3])}, pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    logits = torch.tensor([[[0.0, 1.0, 2.0]]])
    expected = 1.0 - torch.logsumexp(torch.tensor([0.0, 1.0, 2.0]), 0)
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[1]])), expected.view(1, 1))
    torch.testing.assert_close(token_logprobs(logits.bfloat16(), torch.tensor([[1]])), expected.view(1, 1),
                               atol=1e-2, rtol=1e-2)
    rows = select_rows({"ids": torch.tensor([5, 6, 7, 8, 9]), "lengths": torch.tensor([2, 3]),
                        "prompt_lengths": torch.tensor([1, 2]), "item": torch.tensor([4, 7])}, torch.tensor([1]))
    assert rows["ids"].tolist() == [7, 8, 9] and rows["item"].tolist() == [7] and rows["prompt_lengths"].tolist() == [2]


def test_an_encoder_model_and_a_full_finetune_reference_are_refused(length_pairs):
    with pytest.raises(BackboneError, match="not a causal LM"):
        _prepared(length_pairs, model="tiny-random:bert")
    lm = _prepared(length_pairs, model="tiny-random:qwen2", finetune="full").backbone.encoder()
    with pytest.raises(BackboneError, match="finetune=full keeps no copy of the base model"):
        with lm.reference():
            pass


def test_append_eos_needs_an_eos_token(length_pairs, monkeypatch):
    original = CausalLMBackbone.tokenizer

    def without_eos(self):
        tok = original(self)
        tok.eos_token, tok.pad_token = None, "<pad>"
        return tok

    monkeypatch.setattr(CausalLMBackbone, "tokenizer", without_eos)
    with pytest.raises(BackboneError, match=r"backbone.append_eos=true, but the tokenizer of 'tiny-random:qwen2' has "
                                            r"no EOS token; set append_eos=false"):
        _prepared(length_pairs, model="tiny-random:qwen2")
    items = _prepared(length_pairs, model="tiny-random:qwen2", append_eos=False).backbone.inputs(torch.arange(2))
    assert (items["lengths"] > items["prompt_lengths"]).all()


def test_generation_with_a_soft_token_prefix_equals_a_loop_without_cache(length_pairs):
    """transformers' generate prefilled with inputs_embeds (prefix + left-padded prompt) and continued with its
    KV cache gives, token for token, what a full forward at every step (no cache, one row at a time) gives."""
    prepared = _prepared(length_pairs, model="tiny-random:llama", finetune="frozen", dtype="float32")
    lm = prepared.backbone.encoder().eval()
    items = prepared.backbone.inputs(torch.arange(4))
    prompts = lm.prompts(items)
    prefix = torch.randn(4, 3, lm.hidden_size, generator=torch.Generator().manual_seed(1))
    cached = lm.generate(prompts, prefix, max_new_tokens=12)
    starts = torch.cumsum(prompts["lengths"], 0) - prompts["lengths"]
    embed = lm.input_embeddings()
    with torch.no_grad():
        for i in range(4):
            ids = prompts["ids"][starts[i]:starts[i] + prompts["lengths"][i]].tolist()
            new = []
            for _ in range(12):
                x = torch.cat([prefix[i:i + 1], embed(torch.tensor([ids + new]))], 1)
                token = int(lm.model(inputs_embeds=x).logits[0, -1].argmax())
                new.append(token)
                if token == prepared.backbone.tokenizer().eos_token_id:
                    break
            assert cached[i] == new, i
    assert all(len(c) > 0 for c in cached)


def _logprobs_and_grads(lm, items, prefix):
    """Training-path response log-probabilities and mask, and the gradients of a weighted sum of them on the LoRA
    weights and on the soft-token prefix."""
    lm.zero_grad()
    if prefix is not None:
        prefix.grad = None
    logps, mask = lm.response_logprobs(items, prefix)
    weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
    if prefix is not None:
        grads["prefix"] = prefix.grad.clone()
    return logps.detach(), mask, grads


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("soft_tokens", [0, 3])
def test_packed_training_forwards_give_the_padded_logprobs_and_gradients(length_pairs, arch, soft_tokens):
    """``packing``: the sequences (after their soft-token prefix, P-DPO's path) packed into rows, only the
    response-predicting positions projected onto the vocabulary; same log-probabilities, mask and gradients."""
    from plrm.backbones.transformer import pack_rows

    prepared = _prepared(length_pairs, model=f"tiny-random:{arch}", dtype="float32", lora_dropout=0.0, packing=True)
    lm = prepared.backbone.encoder()
    assert lm.packing
    # the longest item, the 7 shortest and 4 from the middle: two short sequences fit in the longest's row
    order = torch.argsort(prepared.backbone.tokens.lengths, stable=True)
    items = prepared.backbone.inputs(torch.cat([order[-1:], order[:7], order[len(order) // 2:][:4]]))
    lengths = (items["lengths"] + soft_tokens).tolist()
    rows = pack_rows(lengths, max(lengths))[2]
    assert len(set(lengths)) > 3 and len(rows) < len(lengths)  # ragged, and some rows hold several sequences
    with torch.no_grad():
        for name, p in lm.model.named_parameters():  # a trained adapter: gradients reach lora_A too
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prefix = None
    if soft_tokens:
        prefix = torch.randn(12, soft_tokens, lm.hidden_size, generator=torch.Generator().manual_seed(0))
        prefix.requires_grad_(True)
    packed, packed_mask, packed_grads = _logprobs_and_grads(lm, items, prefix)
    lm.packing = False
    padded, padded_mask, padded_grads = _logprobs_and_grads(lm, items, prefix)
    assert torch.equal(packed_mask, padded_mask) and packed.shape == padded.shape
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert (packed[~packed_mask] == 0).all()
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > (1 if soft_tokens else 0)
    for name in packed_grads:
        scale = float(padded_grads[name].abs().max())  # sums over many tokens: compare at the tensor's scale
        assert scale > 0, name
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-5 * scale)
    # without gradients the padded path serves (reference log-probabilities, evaluation)
    lm.packing = True
    with torch.no_grad():
        torch.testing.assert_close(lm.response_logprobs(items, prefix)[0], padded, rtol=1e-5, atol=1e-5)


def test_packing_is_refused_for_models_that_mix_packed_sequences_or_transform_their_logits(length_pairs):
    from plrm.backbones.causal_lm import check_packing

    prepared = _prepared(length_pairs, model="tiny-random:qwen2", dtype="float32", lora_dropout=0.0)
    lm = prepared.backbone.encoder()
    check_packing(lm, "tiny-random:qwen2")  # transformers' Qwen2 reads the packed format, plain lm_head
    body, _ = lm.body_and_head()
    original = body.forward

    def ignores_positions(*args, position_ids=None, **kwargs):  # what modeling code without packed support does
        return original(*args, **kwargs)

    body.forward = ignores_positions
    with pytest.raises(BackboneError, match=r"backbone.packing: 'mine' does not keep packed sequences apart"):
        check_packing(lm, "mine")
    body.forward = original
    lm.model.config.final_logit_softcapping = 30.0  # Gemma 2's head: tanh soft-capping after the projection
    with pytest.raises(BackboneError, match=r"backbone.packing: the LM head of 'mine' is not a plain projection .*"
                                            r"final_logit_softcapping=30.0"):
        check_packing(lm, "mine")
    del lm.model.config.final_logit_softcapping
    forward = lm.model.forward

    def scaled(*args, **kwargs):  # a head that scales its logits
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    lm.model.forward = scaled
    with pytest.raises(BackboneError, match=r"backbone.packing: the LM head of 'mine' is not a plain projection"):
        check_packing(lm, "mine")
