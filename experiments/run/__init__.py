"""One run from command to finish: ``setup`` (every check and decision before the model loads),
``start`` (a new or resumed run folder and its protocol), ``loop`` (steps, checkpoints, clean stops),
``resume`` (which run folder to continue), ``faults`` (interrupts and exit codes)."""
