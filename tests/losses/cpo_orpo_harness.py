"""Driving TRL 1.16's CPOTrainer and ORPOTrainer loss code on controlled float64 logits.

What is TRL's and what is stubbed:

* The trainers are real: ``CPOTrainer`` / ``ORPOTrainer`` built from their configs on the tiny model, once
  per test module. Their loss hyper-parameters are then set per case on the instance (``configure``):
  ``__init__`` copies exactly these from the config to the instance and nothing else reads them.
* TRL's own code then runs unchanged: ``get_batch_loss_metrics`` -> ``concatenated_inputs`` (chosen and
  rejected rows joined), ``concatenated_forward`` (the NLL via ``nn.CrossEntropyLoss``, the per-sequence
  sums or means from ``get_batch_logps``), ``cpo_loss`` / ``odds_ratio_loss``, the final combination
  with the NLL, and the logged metrics.
* Stubbed: the policy forward only. ``LogitsStub`` returns float64 logits we drew, over a small vocabulary,
  instead of a network's; the batch is built here in the collated form TRL's data collator produces
  (right-padded ``{chosen,rejected}_{input_ids,attention_mask,labels}``, prompt and padding labelled -100),
  instead of by tokenizing text.

prefopt's losses get the same numbers as ``PairLogps``: ``response_logps`` sums log_softmax(logits) at the
response targets in float64 (prefopt.forward.logprobs does the same, in float32, on a real model).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from prefopt import PairLogps

F64 = torch.float64
IGNORE = -100  # TRL's label for positions that are not scored
PAD_ID = 2  # the tiny model's pad token (tests/conftest.py), only ever seen under a zero attention mask


class LogitsStub(nn.Module):
    """Stands in for the policy: returns the logits it was given and records what TRL passed to it."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.calls: list[tuple[Tensor, dict]] = []

    def forward(self, input_ids, **kwargs):
        self.calls.append((input_ids, kwargs))
        assert input_ids.shape == self.logits.shape[:2]
        return SimpleNamespace(logits=self.logits)


def random_pair_batch(
    pairs: int, length: int, vocab: int, seed: int, *, prompt_tokens: int | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """A collated batch of ``pairs`` preference pairs and float64 logits (2 * pairs, length, vocab) for it.

    Each pair has its own prompt (``prompt_tokens`` long, or a random 1..length/2) shared by its chosen and
    rejected rows, and response lengths drawn independently, so both the token counts within a pair and
    the padding differ. Logits are standard normal times 2, a leaf that requires grad.
    """
    gen = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=gen))  # noqa: E731
    batch: dict[str, list[Tensor]] = {f"{side}_{key}": [] for side in ("chosen", "rejected")
                                     for key in ("input_ids", "attention_mask", "labels")}
    for _ in range(pairs):
        prompt_len = prompt_tokens or draw(1, length // 2)
        prompt = torch.randint(3, vocab, (prompt_len,), generator=gen)
        for side in ("chosen", "rejected"):
            response_len = draw(1, length - prompt_len + 1)
            ids = torch.full((length,), PAD_ID, dtype=torch.long)
            ids[:prompt_len] = prompt
            ids[prompt_len : prompt_len + response_len] = torch.randint(3, vocab, (response_len,), generator=gen)
            attention = torch.zeros(length, dtype=torch.long)
            attention[: prompt_len + response_len] = 1
            labels = torch.full((length,), IGNORE, dtype=torch.long)
            labels[prompt_len : prompt_len + response_len] = ids[prompt_len : prompt_len + response_len]
            for key, value in (("input_ids", ids), ("attention_mask", attention), ("labels", labels)):
                batch[f"{side}_{key}"].append(value)
    stacked = {key: torch.stack(rows) for key, rows in batch.items()}
    logits = (2 * torch.randn(2 * pairs, length, vocab, generator=gen, dtype=F64)).requires_grad_(True)
    return stacked, logits


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(token t | tokens < t) for t = 1..T-1, float64: (rows, T-1)."""
    return logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def response_logps(batch: dict[str, Tensor], logits: Tensor) -> PairLogps:
    """PairLogps (no reference) of the batch: sums of the response targets' log-probs and their counts."""
    pairs = batch["chosen_input_ids"].shape[0]
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:] != IGNORE
    per_token = token_logps(logits, input_ids) * mask
    sums, counts = per_token.sum(-1), mask.sum(-1).to(F64)
    return PairLogps(
        policy_chosen=sums[:pairs], policy_rejected=sums[pairs:],
        chosen_tokens=counts[:pairs], rejected_tokens=counts[pairs:],
    )


def chosen_sequence_nll(batch: dict[str, Tensor], logits: Tensor) -> Tensor:
    """Token-mean NLL of the chosen rows over every non-padding target, prompt included (ORPO's TRL form)."""
    pairs = batch["chosen_input_ids"].shape[0]
    mask = batch["chosen_attention_mask"][:, 1:].bool()
    per_token = token_logps(logits[:pairs], batch["chosen_input_ids"])
    return -(per_token * mask).sum() / mask.sum()


def build_trainer(kind: str, model_dir, tokenizer, output_dir, **config):
    """A real CPOTrainer or ORPOTrainer (``kind``) on the tiny model, CPU, float32 weights, no logging."""
    from datasets import Dataset

    with warnings.catch_warnings():  # the "trl.experimental is unstable" notice, known and pinned here
        warnings.simplefilter("ignore")
        if kind == "cpo":
            from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
        else:
            from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    rows = Dataset.from_dict({"prompt": ["The movie was"] * 2, "chosen": [" good."] * 2, "rejected": [" bad."] * 2})
    args = Config(
        output_dir=str(output_dir), report_to=[], bf16=False, use_cpu=True, per_device_train_batch_size=2,
        disable_tqdm=True, max_length=64, **config,
    )
    return Trainer(model=str(model_dir), args=args, train_dataset=rows, processing_class=tokenizer)


def configure(trainer, **values):
    """Set loss hyper-parameters on a built trainer, as its ``__init__`` does from the config."""
    for key, value in values.items():
        assert hasattr(trainer, key), f"{type(trainer).__name__} has no attribute {key!r}"
        setattr(trainer, key, value)
    return trainer


def run_trl(trainer, batch: dict[str, Tensor], logits: Tensor) -> tuple[Tensor, dict[str, float], Tensor]:
    """TRL's ``get_batch_loss_metrics`` on the batch with the stub policy: (loss, metrics, d loss / d logits)."""
    stub = LogitsStub(logits)
    loss, metrics = trainer.get_batch_loss_metrics(stub, batch, train_eval="train")
    [(input_ids, _)] = stub.calls  # one forward, over the chosen rows then the rejected rows
    assert torch.equal(input_ids, torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]))
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, metrics, grad


def reference_free_pair_logps(pc, pr, lc, lr, *, requires_grad: bool = False) -> PairLogps:
    """Reference-free PairLogps from plain lists, in float64."""
    as_tensor = lambda v, grad=False: torch.tensor(v, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    return PairLogps(
        policy_chosen=as_tensor(pc, requires_grad), policy_rejected=as_tensor(pr, requires_grad),
        chosen_tokens=as_tensor(lc), rejected_tokens=as_tensor(lr),
    )
