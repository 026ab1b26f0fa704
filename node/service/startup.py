"""Process-wide settings of the classifier process, made once and explicitly at start-up
(never in a constructor): torch's thread count, the allocator, highdicom's tables and the
release of start-up library pages. Each lowers the node's resident memory or bounds its CPU
use; none changes a result."""

from __future__ import annotations

import logging

import torch

from node.classify.sr import slim_highdicom_tables
from node.config import Config
from node.dicom.codes import ACCEPTED_SOP_CLASSES
from node.logs import keep_phi_out_of_logs
from node.runtime import release_library_pages, trim_memory, tune_malloc

log = logging.getLogger(__name__)


def prepare_classifier_process(cfg: Config) -> None:
    """Before the model loads: fewer malloc arenas (before our threads exist), torch threads,
    highdicom's module table slimmed to our IODs, torch's start-up code paged out."""
    keep_phi_out_of_logs()
    tune_malloc()
    torch.set_num_threads(cfg.node.torch_threads)
    slim_highdicom_tables(ACCEPTED_SOP_CLASSES)
    trim_memory()
    release_library_pages()


def settle_after_model_load() -> None:
    """After the model loaded: the pages that loading and checking it ran once."""
    release_library_pages()
