"""TRL as an oracle: its DPOTrainer's loss on the same tokens and weights equals plrm's DPO loss (what P-DPO
computes for one user with alpha = 1) and, with the reference log-probabilities set to 0, GenARM's loss. Each
side computes its own log-probabilities: TRL right-pads and computes the logits of every position; plrm left-pads
and keeps the last R + 1 (plrm.backbones.causal_lm). So this also checks plrm's log-probabilities."""

import pytest
import torch

from plrm.backbones.causal_lm import CausalLM, CausalLMBackbone
from plrm.backbones.text import pad
from plrm.data.datamodule import PreparedData
from plrm.data.files import PreferenceFiles
from plrm.methods.base import concat_inputs
from plrm.methods.losses import dpo_logits, dpo_loss

trl = pytest.importorskip("trl")


def _trl_inputs(items: dict, pad_id: int) -> dict:
    """TRL's collated batch from plrm's items: right-padded ids, attention mask, completion (response) mask."""
    input_ids, mask = pad(items, pad_id)
    positions = torch.arange(input_ids.shape[1])[None, :]
    completion = (positions >= items["prompt_lengths"][:, None]) & mask.bool()
    return {"input_ids": input_ids, "attention_mask": mask, "completion_mask": completion.long()}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_trl_dpo_trainer_loss_equals_plrm_dpo_and_genarm(tmp_path, length_pairs, beta):
    from datasets import Dataset
    from transformers import AutoTokenizer

    data = PreferenceFiles(PreferenceFiles.Config(path=str(length_pairs))).load()
    backbone = CausalLMBackbone(CausalLMBackbone.Config(model="tiny-random:qwen2", finetune="frozen",
                                                        dtype="float32"))
    prepared = PreparedData(data, backbone)
    policy = backbone.load_base().eval()
    tok = AutoTokenizer.from_pretrained(backbone.path)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=beta, use_cpu=True,
                         logging_strategy="no", save_strategy="no")
    trainer = trl.DPOTrainer(model=policy, args=args, processing_class=tok,
                             train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}))
    trainer.model.eval()
    with torch.no_grad():  # a trained policy: move it away from the reference TRL copied at construction
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    b = prepared.backbone
    items = concat_inputs(b.inputs(torch.arange(0, 16, 2)), b.inputs(torch.arange(1, 16, 2)))  # chosen; rejected
    inputs = _trl_inputs(items, b.pad_id)
    with torch.no_grad():
        trl_dpo = trainer._compute_loss(trainer.model, dict(inputs), return_outputs=False)
        lp = CausalLM(trainer.model, b.pad_id, 64).sequence_logprob(items)
        ref = CausalLM(trainer.ref_model, b.pad_id, 64).sequence_logprob(items)
        plrm_dpo = dpo_loss(dpo_logits(lp[:8], lp[8:], ref[:8], ref[8:], beta))
        torch.testing.assert_close(plrm_dpo, trl_dpo, atol=1e-5, rtol=1e-5)

        trainer.precompute_ref_logps = True  # GenARM: DPO with pi_ref = 1, i.e. reference log-probabilities 0
        trl_genarm = trainer._compute_loss(trainer.model, {**inputs, "ref_chosen_logps": torch.zeros(8),
                                                           "ref_rejected_logps": torch.zeros(8)}, False)
        torch.testing.assert_close(dpo_loss(dpo_logits(lp[:8], lp[8:], beta=beta)), trl_genarm, atol=1e-5, rtol=1e-5)
    assert abs(float(plrm_dpo) - float(trl_genarm)) > 1e-3  # the reference term mattered
