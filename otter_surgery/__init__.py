"""otter_surgery: Otter (non-disruptive parameter insertion, arXiv 2408.10764) for any decoder LLM.

    omodel = otter.insert(model, otter.InsertSpec(extra_dim=64, extra_ffn=128))   # one inserted KV group of heads
    out = omodel(input_ids=ids, attention_mask=mask)   # out.logits == model(...).logits, out.reward
    otter.verify(model, omodel)
    gen = otter.generate(omodel, ids, attention_mask=mask, guide=otter.RewardGuided(weight=1.5, top_k=10))
"""
from .checkpoint import AdapterError, MergeReport, load, load_merged, merge, save
from .deploy import compile, fuse
from .generate import Calibrated, GenerateOutput, RewardGuided, Speculative, generate
from .errors import CaptureError, OtterError, SpecError, UnsupportedGraphError, VerificationError
from .insert import insert
from .model import OtterMeta, OtterModel, OtterOutput
from .processor import GuideLogitsProcessor
from .spec import InsertSpec
from .train import TrainingDiverged, TrainResult, evaluate, train
from .verify import VerifyReport, verify

__all__ = [
    "insert", "verify", "generate", "RewardGuided", "Calibrated", "Speculative", "GenerateOutput", "GuideLogitsProcessor", "train", "evaluate", "save", "load", "InsertSpec", "OtterModel", "OtterMeta", "OtterOutput",
    "VerifyReport", "TrainResult", "TrainingDiverged", "AdapterError", "merge", "load_merged", "fuse", "compile", "MergeReport",
    "OtterError", "SpecError", "UnsupportedGraphError", "CaptureError", "VerificationError",
]
__version__ = "0.1.0"

import logging as _logging

_logging.getLogger("otter_surgery").addHandler(_logging.NullHandler())  # a library logs; the application decides
