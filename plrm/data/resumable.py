"""A DataLoader whose place in the epoch survives a checkpoint, so ``plrm fit --resume`` continues with exactly the
batches an uninterrupted run would have drawn.

Lightning saves the state of a training DataLoader that has ``state_dict`` / ``load_state_dict`` in its
checkpoints and hands it back on resume (its "resumable loader" interface); torch's DataLoader has neither, and a
run resumed mid-epoch would otherwise start the epoch's order again from a fresh generator. The state is the
shuffling generator's state at the start of the current epoch and how many batches of it were drawn: on resume
the same permutation is drawn again and those batches are skipped (positions only: no data is read for them).
Written by hand because torch's own resumable loader (torchdata's StatefulDataLoader) is not among plrm's
dependencies and saves far more than a single-process index sampler needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class _Resumable(Sampler):
    """``batches`` (a sampler of whole batches) that counts what it yielded and can skip a prefix of an epoch."""

    def __init__(self, batches: Sampler, generator: torch.Generator | None):
        self.batches, self.generator = batches, generator
        self.epoch_start: torch.Tensor | None = None  # the generator's state before this epoch's permutation
        self.yielded = 0
        self.resume_from: tuple[torch.Tensor | None, int] | None = None
        self.in_flight = 0  # batches yielded but not yet trained (a checkpoint taken as a batch starts: 1)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        skip = 0
        if self.resume_from is not None:
            state, skip = self.resume_from
            self.resume_from = None
            if state is not None and self.generator is not None:
                self.generator.set_state(state)
        self.epoch_start = self.generator.get_state() if self.generator is not None else None
        self.yielded = 0
        for i, batch in enumerate(self.batches):
            self.yielded = i + 1
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, Any]:
        consumed = self.yielded - self.in_flight
        if consumed >= len(self):  # the epoch is over: the next one starts from the generator as it is now
            state = self.generator.get_state() if self.generator is not None else None
            return {"generator": state, "batches": 0}
        return {"generator": self.epoch_start, "batches": consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_from = (state["generator"], int(state["batches"]))


class ResumableLoader(DataLoader):
    """A single-process DataLoader over ``sampler`` (it yields whole index batches; the dataset gathers each in
    one call) whose epoch position Lightning checkpoints and restores. ``generator``: the generator that
    ``sampler`` shuffles with (None: a fixed order)."""

    def __init__(self, dataset: Dataset, sampler: Sampler, generator: torch.Generator | None = None):
        self.position = _Resumable(sampler, generator)
        super().__init__(dataset, sampler=self.position, batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)
