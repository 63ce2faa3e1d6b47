"""Training: the tape, the solvers (``sgd``, ``adam``), ``dnn_trainer`` and its
synchronisation file, one concern a module (see trainer.py for an example)."""
from .progress import steps_without_decrease, steps_without_decrease_robust
from .solvers import adam, sgd
from .tape import Ctx, Tape
from .trainer import dnn_trainer

# the names the tests of earlier versions import
_Tape = Tape
_steps_without_decrease = steps_without_decrease
_steps_without_decrease_robust = steps_without_decrease_robust

__all__ = ["adam", "sgd", "dnn_trainer", "Tape", "Ctx"]
