"""otter_surgery: Otter (non-disruptive parameter insertion, arXiv 2408.10764) for any decoder LLM.

    omodel = otter.insert(model, otter.InsertSpec(extra_dim=64, extra_heads=1, extra_ffn=128))
    out = omodel(input_ids=ids, attention_mask=mask)   # out.logits == model(...).logits, out.reward
    otter.verify(model, omodel)
"""
from .adapter import AdapterError, load, save
from .deploy import MergeReport, compile, fuse, load_merged, merge
from .generate import Calibrated, GenerateOutput, RewardGuided, generate
from .errors import CaptureError, OtterError, SpecError, UnsupportedGraphError, VerificationError
from .insert import insert
from .model import OtterModel, OtterOutput
from .spec import InsertSpec
from .train import TrainResult, evaluate, train
from .verify import VerifyReport, verify

__all__ = [
    "insert", "verify", "generate", "RewardGuided", "Calibrated", "GenerateOutput", "train", "evaluate", "save", "load", "InsertSpec", "OtterModel", "OtterOutput",
    "VerifyReport", "TrainResult", "AdapterError", "merge", "load_merged", "fuse", "compile", "MergeReport",
    "OtterError", "SpecError", "UnsupportedGraphError", "CaptureError", "VerificationError",
]
__version__ = "0.1.0"
