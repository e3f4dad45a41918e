"""Hook specifications: the whole surface a plugin can implement.

Every hook takes keyword arguments only, so hooks can gain arguments later
without breaking plugins that do not use them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from edgeplug.commands import CommandRegistry
    from edgeplug.passes import Pass
    from edgeplug.trainer import EpochResult, StepInfo

PROJECT_NAME = "edgeplug"
"""Name of the hook marker and of the entry-point group plugins register under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def edgeplug_register_passes(register: Callable[[type[Pass]], None]) -> None:
    """Register pass classes by calling ``register(PassClass)`` once per pass.

    Called when edgeplug first needs the list of passes (and again after a plugin
    is registered at runtime), once per plugin.

    :param register: callback that adds a :class:`edgeplug.Pass` subclass to the registry.

    .. versionadded:: 0.1
    """


@hookspec
def edgeplug_before_step(step: StepInfo) -> None:
    """Run before each training step.

    A hook may add arrays to ``step.extra_inputs`` to feed graph inputs that a pass
    added to the training model. It also runs before each evaluation batch, with
    ``step.training`` False, so those inputs are fed there too.

    :param step: the step about to run (epoch, global step, the batch, the ORT module).

    .. versionadded:: 0.1
    """


@hookspec
def edgeplug_after_step(step: StepInfo, loss: float) -> None:
    """Run after each training step, once the optimizer has updated the parameters.

    :param step: the step that ran; ``step.outputs`` holds the training model's outputs.
    :param loss: the step's loss.

    .. versionadded:: 0.1
    """


@hookspec
def edgeplug_epoch_end(epoch: EpochResult, epochs: int, step: int, artifact_dir: Path) -> None:
    """Run at the end of every training epoch, once its checkpoint is written: the place for experiment
    trackers (MLflow, Weights & Biases, TensorBoard, a CSV file) to record the epoch's metrics.

    :param epoch: the epoch that ended: ``epoch.epoch`` (1-based), ``epoch.train`` and ``epoch.eval``
        (``loss`` and ``accuracy``; ``eval`` is None without evaluation data; ``accuracy`` is None
        for losses other than cross-entropy), ``epoch.seconds``.
    :param epochs: the number of epochs the run trains to.
    :param step: training steps run so far (over every run of this folder, resumed ones included).
    :param artifact_dir: the artifact folder being trained.

    .. versionadded:: 1.0
    """


@hookspec
def edgeplug_save_state(directory: Path) -> None:
    """Save state carried across steps into ``directory`` while a checkpoint is written.

    The folder is inside a checkpoint that becomes visible atomically, so files
    written here are either all kept or all discarded.

    :param directory: a folder reserved for this checkpoint's hook state.

    .. versionadded:: 0.1
    """


@hookspec
def edgeplug_load_state(directory: Path) -> None:
    """Restore state written by :func:`edgeplug_save_state` when training resumes.

    :param directory: the folder given to ``edgeplug_save_state`` for the checkpoint being resumed.

    .. versionadded:: 0.1
    """


@hookspec
def edgeplug_register_commands(commands: CommandRegistry) -> None:
    """Add subcommands to the ``edgeplug`` command line.

    Call ``commands.add_parser(name, help=...)`` (it returns an ``argparse.ArgumentParser``) and
    give the parser a ``run`` default: ``parser.set_defaults(run=function)``, where
    ``function(args)`` returns the exit status. Print the result with
    :func:`edgeplug.plugin_api.print_result` (text, or one JSON document under ``--json``), log
    what happens on the way with ``logging``, show long work with
    :class:`edgeplug.plugin_api.Progress`. Every command gets the global options (``--json``,
    ``-q``, ``-v``, ``--no-progress``, ``--debug``) and help that shows defaults. Raise
    :class:`edgeplug.EdgeplugError` subclasses for user errors: the CLI prints them as one line
    and exits 2. A name that a core command or another plugin already uses is refused.

    :param commands: the ``edgeplug`` command collection (:class:`edgeplug.plugin_api.CommandRegistry`).

    .. versionadded:: 0.1
    .. versionchanged:: 1.0
       ``commands`` is a ``CommandRegistry`` (it was argparse's private subparsers action, whose
       ``add_parser`` it keeps).
    """
