"""When a training run saves: the checkpoint interval, the last step and early exits, in one place.

As torchtitan's ``CheckpointManager`` does, the checkpointer owns the decision; the loop only
reports each finished iteration (and whether it is the last one this process will run). The
iteration is saved at most once, however many reasons there are to save it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional


class Checkpointer:
    """Saves through ``save(iteration)`` every ``interval`` iterations and at the last step.

    Without a ``save_dir`` (no ``--save``) it never saves.
    """

    def __init__(self, save_dir: Optional[str], interval: Optional[int], save: Callable[[], None]) -> None:
        self.save_dir, self.interval, self._save = save_dir, interval, save
        self.last_saved: Optional[int] = None

    def should_save(self, iteration: int, last_step: bool) -> bool:
        """Whether ``iteration`` is due: the interval hit, or the run stops after it; not saved yet."""
        if not self.save_dir or self.last_saved == iteration:
            return False
        return last_step or bool(self.interval and iteration % self.interval == 0)

    def step(self, iteration: int, last_step: bool = False) -> bool:
        """Save ``iteration`` if it is due; return whether it saved."""
        if not self.should_save(iteration, last_step):
            return False
        self._save()
        self.last_saved = iteration
        return True
