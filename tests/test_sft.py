"""SFT: packing is exact, the step schedule is resumable, and the Ray Train job learns and survives a
crashed worker."""

import json

import pytest
import torch

from afd_ray.algo.masked import token_logprobs
from afd_ray.data.tokenize import collate
from afd_ray.models.loading import load_policy
from afd_ray.sft import pack, step_indices


def test_packed_rows_give_the_same_token_logprobs_as_padded_rows(tiny_llama_dir):
    model = load_policy(str(tiny_llama_dir)).eval()
    seqs = [([1, 5, 6], [7, 8, 2]), ([1, 9], [10, 2]), ([1, 11, 12, 13], [14, 15, 16, 2]), ([1, 3], [4, 2])]
    packed = pack(seqs, max_len=12, pad_id=0)
    assert packed.input_ids.shape[0] < len(seqs)  # several sequences share a row
    with torch.no_grad():
        lp = token_logprobs(model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                  position_ids=packed.position_ids).logits[:, :-1], packed.input_ids[:, 1:])
        b = collate([p for p, _ in seqs], [r for _, r in seqs], 0)
        ref = token_logprobs(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1],
                             b.input_ids[:, 1:])
    assert int(packed.loss_mask.sum()) == sum(len(r) for _, r in seqs)
    got = sorted(lp[packed.loss_mask.bool()].tolist())
    want = sorted(ref[b.shifted_mask.bool()].tolist())
    assert got == pytest.approx(want, abs=1e-5)
    # sft.loss=sequence (seeds/004 Protocol 1) on packed rows: per-demonstration sums over the 4 demonstrations
    from afd_ray.algo.losses import sft_loss

    per_demo = -(ref * b.shifted_mask).sum(1)
    assert float(sft_loss(lp, packed.loss_mask, "sequence", denom=len(seqs))) == pytest.approx(
        float(per_demo.mean()), abs=1e-5)
    assert float(sft_loss(lp, packed.loss_mask, "token", denom=sum(len(r) for _, r in seqs))) == pytest.approx(
        float(per_demo.sum()) / sum(len(r) for _, r in seqs), abs=1e-5)


def test_pack_rejects_a_sequence_longer_than_a_row():
    with pytest.raises(ValueError, match="does not fit sft packing rows of 4 tokens"):
        pack([([1, 2, 3], [4, 5])], max_len=4, pad_id=0)


def test_step_schedule_depends_only_on_the_step():
    a = [step_indices(100, s, 32, seed=1) for s in range(7)]
    assert a == [step_indices(100, s, 32, seed=1) for s in range(7)]
    assert len(set(sum(a[:3], []))) == 96  # one epoch (3 steps of 32 of 100) repeats no demonstration
    assert a[3] != a[0]  # the next epoch reshuffles


@pytest.mark.slow
def test_ray_train_sft_learns_and_recovers_from_a_crashed_worker(ray_local, toy_init, tmp_path, tokenizer,
                                                                monkeypatch):
    from afd_ray import toy
    from afd_ray.config import load_config
    from afd_ray.run import run
    from afd_ray.sft import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "7")  # the last worker dies once after step 7; checkpoints every 5 steps
    cfg = load_config("toy", [f"model.policy={toy_init}", "run.method=sft", f"run.output_dir={tmp_path}",
                              "run.name=sft", "sft.num_workers=2", "sft.max_steps=20", "sft.batch_size=32",
                              "sft.micro_batch_size=8", "sft.lr=3e-3", "sft.checkpoint_every=5", "sft.packing=true"])
    rd = run(cfg, echo=lambda *_: None)
    sft_dir = rd.path / "sft"
    assert (sft_dir / ".fault_injected").is_file()  # the crash happened and the job still finished
    state = json.loads((sft_dir / "state.json").read_text())
    assert state["metrics"]["step"] == 20
    # learning: held-out NLL and golden reward of greedy-free samples improve on pi_init
    demos = toy.make_demonstrations(tokenizer, 256, seed=123)
    prompts = torch.tensor([d.prompt_ids for d in demos])

    def golden(path):
        model = load_policy(str(path)).eval()
        torch.manual_seed(0)
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                             max_new_tokens=10, pad_token_id=tokenizer.eos_token_id)
        return sum(toy.golden_reward(prompts.tolist(), out[:, prompts.shape[1]:].tolist(), tokenizer)) / len(demos)

    assert golden(sft_dir / "model") > golden(toy_init) + 0.1
    assert "heldout_nll" in (rd.path / "report.md").read_text()
    assert "RayTrainWorker" in (rd.path / "logs" / "sft.log").read_text()  # the workers' output
    card = (sft_dir / "model" / "README.md").read_text()  # pi_SFT's model card
    assert "afd_ray (sft)" in card and "step 20" in card and "| sft/loss |" in card
