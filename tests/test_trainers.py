"""The emulator trains under Hugging Face Trainer and accelerate as it does in a plain loop."""

import pytest
import torch
from conftest import random_ids, state_dict_copy

import offsite_kernels as ok
from offsite_kernels.tiny import tiny_model


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int) -> None:
        self.ids = random_ids(n, length, seed=4)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def changed_keys(emu, before):
    return {k for k, v in emu.state_dict().items() if not torch.equal(v, before[k])}


def adapter_keys(emu):
    return {f"model.{emu.family.blocks}.{p}." for p in emu.layout.adapter_positions()}


@pytest.mark.parametrize("options", [{}, {"fast": True, "compile": "default"}], ids=["plain", "fast_compiled"])
def test_hf_trainer_trains_only_the_adapter(tmp_path, options):
    from transformers import Trainer, TrainingArguments

    emu = ok.make_emulator(tiny_model("opt", seed=5), bottom=1, top=1, emulator_layers=2, **options)
    before = state_dict_copy(emu)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    result = Trainer(model=emu, args=args, train_dataset=TokenDataset(12, 10)).train()
    assert result.global_step == 3
    changed = changed_keys(emu, before)
    assert changed and all(any(k.startswith(p) for p in adapter_keys(emu)) for k in changed)
    if options.get("compile"):  # the emulator blocks' training calls went through the compiled forward
        from offsite_kernels.nn.compiled_blocks import compile_report

        assert compile_report(emu)["compiled_calls"] == 3 * 2


def test_accelerate_prepares_and_steps():
    from accelerate import Accelerator

    emu = ok.make_emulator(tiny_model("qwen2", seed=6), bottom=1, top=1, emulator_layers=2)
    before = state_dict_copy(emu)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(list(emu.adapter_parameters()), lr=1e-2)
    model, optimizer = accelerator.prepare(emu, optimizer)
    ids = random_ids(2, 9, seed=7)
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    changed = changed_keys(emu, before)
    assert changed and all(any(k.startswith(p) for p in adapter_keys(emu)) for k in changed)
