"""Imported once by the local launcher's fork server, so that cells start with the libraries loaded.

Only used when no GPU is visible (``peft_lab.sweep.can_fork_cells``): importing these does not
initialise CUDA on a CPU-only machine, and a process forked from a parent that initialised the
CUDA driver cannot use CUDA. Importing torch, transformers and peft takes ~7-10 s on 2 cores; a
12-cell sweep pays it once instead of twelve times. Each cell is still its own process.
"""

import datasets  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import wandb  # noqa: F401

import peft_lab.config  # noqa: F401
import peft_lab.run  # noqa: F401
import peft_lab.training  # noqa: F401
