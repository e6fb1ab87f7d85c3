"""A Hugging Face ``Trainer`` run made resumable by gpupool: a tiny GPT-2 on synthetic tokens.

The model is built from a ``GPT2Config`` (no hub download). The gpupool lines are marked; the
rest is an ordinary Trainer script. Standalone (no gpupool) it runs the same way, writing its
checkpoints into ./checkpoints.
"""

from __future__ import annotations

import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gpupool.integrations.transformers import GpupoolCallback, resume_from_checkpoint  # gpupool

TOTAL_STEPS = int(os.environ.get("TOTAL_STEPS", "600"))
SAVE_STEPS = int(os.environ.get("SAVE_STEPS", "100"))
BATCH = int(os.environ.get("BATCH", "8"))
SEQ_LEN = int(os.environ.get("SEQ_LEN", "32"))
VOCAB = 128
SEED = 1234
OUTPUT_DIR = "checkpoints"  # = checkpoint.path in experiment.yaml
FINAL_DIR = "final"  # = outputs in experiment.yaml


class SyntheticTokens(torch.utils.data.Dataset):
    """Sequences that count up from a random start (mod VOCAB): learnable, same on every machine."""

    def __init__(self, size: int = 512):
        starts = torch.randint(0, VOCAB, (size, 1), generator=torch.Generator().manual_seed(SEED))
        self.tokens = (starts + torch.arange(SEQ_LEN)) % VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def build_trainer(extra_callbacks: list | None = None) -> Trainer:
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    args = TrainingArguments(
        output_dir=OUTPUT_DIR, max_steps=TOTAL_STEPS, per_device_train_batch_size=BATCH,
        learning_rate=1e-3, save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=2,
        logging_steps=10, report_to=[], seed=SEED, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, dataloader_num_workers=int(os.environ.get("WORKERS", "0")),
    )
    callbacks = [*(extra_callbacks or []), GpupoolCallback()]  # gpupool: report, save, stop
    return Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=SyntheticTokens(),
                   callbacks=callbacks)


def main(extra_callbacks: list | None = None) -> None:
    trainer = build_trainer(extra_callbacks)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint(OUTPUT_DIR))  # gpupool: None at first
    trainer.save_model(FINAL_DIR)  # reached only when training finished (a yield exits with 75)
    print(f"done: step {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
