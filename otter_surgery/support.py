"""`otter-surgery support`: which causal-LM families of the installed transformers — and which decoders outside
transformers (`--decoder MODULE:FACTORY[:ARG]`) — go through insert(), checked live on tiny random models
(captured / experts routed / inserted / bit-identical fp32 / bf16 on a padded batch of 2 x 9 and single rows of
1 and 6 tokens / decodes: otter.generate gives the model's own greedy tokens — transformers' generate, padded
and unpadded batches; a plain decoder's greedy loop — fp32)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


# Family-specific sizes a default config sets large (latent attention ranks, rotary sub-dims, expert counts,
# encoder-decoder and vision names): shrunk wherever a family's default config has them and sets them larger.
SHRINK = dict(
    # latent attention (MLA) and rotary sub-dims
    qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=8, q_lora_rank=16, kv_lora_rank=16,
    rotary_dim=4, index_head_dim=8, index_n_heads=2,
    # experts
    n_routed_experts=4, n_shared_experts=1, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
    num_experts_per_token=2, n_group=2, num_expert_group=2,
    topk_group=1, moe_intermediate_size=16, shared_expert_intermediate_size=16, shared_experts_intermediate_size=16,
    expert_ffn_hidden_size=16, zero_expert_num=2, ffn_hidden_size=40, first_k_dense_replace=1, num_dense_layers=1,
    first_k_dense=1,
    # encoder-decoder and vision names
    decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=40, encoder_ffn_dim=40, decoder_layers=2,
    encoder_layers=2, image_size=32, patch_size=8, vision_output_dim=32, projection_dim=32, num_global_layers=1,
    # state-space and hybrid layers
    mamba_n_heads=8, mamba_d_head=8, n_mamba_heads=2, mamba_headdim=32, mamba_d_state=16, mamba_dt_rank=8,
    mamba_chunk_size=16, num_heads=8, attention_head_dim=16,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=64, num_kv_shared_layers=0)
# generation-config fields that make transformers' greedy something other than the model's argmax
PROCESSOR_FIELDS = ("forced_eos_token_id", "forced_bos_token_id", "min_length", "min_new_tokens", "repetition_penalty",
                    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                    "begin_suppress_tokens", "sequence_bias")
# defaults of None that the model still computes with
UNSET_OK = {"num_experts_per_tok", "n_routed_experts", "n_shared_experts"}


def _shrunk(default) -> dict:
    out = {}
    for key, want in SHRINK.items():
        have = getattr(default, key, None) if key in vars(default) else None
        if (isinstance(have, int) and not isinstance(have, bool) and have > want) or (
                have is None and key in UNSET_OK and hasattr(default, key)):
            out[key] = want
    # never route to more experts than there are (a family whose default has one expert keeps top-1)
    experts = next((v for k in ("n_routed_experts", "num_experts", "num_local_experts")
                    if isinstance(v := out.get(k, vars(default).get(k)), int)), None)
    for key in ("num_experts_per_tok", "num_experts_per_token"):
        if key in out and experts is not None:
            out[key] = min(out[key], experts)
    return out


def _per_layer_lists(default) -> set[str]:
    """Keys holding one entry per layer (layer_types, ...): left to the config to rebuild for the tiny depth."""
    layers = getattr(default, "num_hidden_layers", None)
    return {k for k, v in vars(default).items() if isinstance(v, list) and layers and len(v) == layers}


def tiny_config(arch: str, **overrides):
    """A tiny config of family `arch`: TINY's standard names (through each config's attribute_map), family sizes
    shrunk (SHRINK), and the same for nested configs (text/vision). Keys a family refuses (a read-only head_dim,
    a latent-attention family's kv heads) are dropped one at a time until the config builds and a tiny model
    built from it runs a forward."""
    from transformers import AutoConfig, PretrainedConfig

    default = AutoConfig.for_model(arch)
    kwargs = {**TINY, **_shrunk(default), **overrides}
    for name, sub in vars(default).items():
        if isinstance(sub, PretrainedConfig):
            keep = {k: v for k, v in sub.to_dict().items() if k not in _per_layer_lists(sub)}
            kwargs[name] = {**keep, **{k: v for k, v in TINY.items() if hasattr(sub, k)}, **_shrunk(sub)}
    first = None
    # A hybrid family whose attention layers come every few layers has none in two: then try deeper. A config
    # whose model also runs with its cache (as generate runs it) first; else one that runs without (as capture).
    depths = (None,) if "num_hidden_layers" in overrides else (None, 4, 8)
    for cache, layers in [(cache, layers) for cache in (True, False) for layers in depths]:
        tried = copy.deepcopy(kwargs)
        for d in ([tried] + [v for v in tried.values() if isinstance(v, dict)]) if layers else ():
            d["num_hidden_layers"] = layers
        # (latent attention wants as many kv heads as query heads; some families refuse the key outright)
        for drop in (None, "head_dim", "kv=heads", "num_key_value_heads", "intermediate_size"):
            key = "num_key_value_heads" if drop == "kv=heads" else drop
            if drop and key not in overrides:
                for d in [tried] + [v for v in tried.values() if isinstance(v, dict)]:
                    if drop == "kv=heads":
                        d[key] = d.get("num_attention_heads", TINY["num_attention_heads"])
                    else:
                        d.pop(key, None)
            try:
                config = AutoConfig.for_model(arch, **tried)
                _runs(config, cache)
                return config
            except Exception as exc:  # config validators and model code raise many types
                first = first or exc
    raise first


def _runs(config, cache: bool) -> None:
    import torch

    from otter_surgery.testing import build_model

    ids = torch.full((1, 4), 3)
    with torch.no_grad():
        build_model(config)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=cache)


@dataclass
class SupportRow:
    arch: str
    captured: bool = False
    inserted: bool = False
    fp32: bool = False
    bf16: bool = False
    decodes: bool = False
    note: str = ""
    decode_note: str = ""
    strategy: str = ""  # how the sequence length was captured (capture.CAPTURE_STRATEGIES)
    moe: bool = False  # the captured graph selects experts (a value-dependent choice of indices: moe._selects)
    leaves: int = 0  # modules captured as leaves (Python branches on tensor values, or fast paths: otter_surgery.leaves)


def check_family(arch: str) -> SupportRow:
    """A transformers family, on a tiny random config."""
    from otter_surgery.testing import build_model

    row = SupportRow(arch)
    try:
        model = build_model(tiny_config(arch))
    except Exception as exc:
        row.note = f"tiny config/model: {type(exc).__name__}: {str(exc)[:120]}"
        return row
    return _check(row, lambda dtype: model.to(dtype))


def check_decoder(spec: str) -> SupportRow:
    """A decoder outside transformers, called as forward(idx): `spec` is "module:factory" or
    "module:factory:arg" (e.g. "my_models:build" or "tests.zoo:build:gemma"); the factory returns the model
    (given `dtype=` when it takes that keyword, else the model is cast with .to())."""
    import importlib
    import inspect

    row = SupportRow(spec)
    try:
        module, name, *arg = spec.split(":", 2)
        factory = getattr(importlib.import_module(module), name)
        takes_dtype = "dtype" in inspect.signature(factory).parameters
    except Exception as exc:
        row.note = f"cannot load the decoder factory {spec!r}: {type(exc).__name__}: {str(exc)[:120]}"
        return row

    def make(dtype):
        if takes_dtype:
            return factory(*arg, dtype=dtype).eval()
        return factory(*arg).to(dtype).eval()

    return _check(row, make)


def _check(row: SupportRow, make) -> SupportRow:
    """capture -> insert -> bit-identical logits in fp32 and bf16 -> decoding, for the model `make(dtype)`."""
    import torch

    import otter_surgery as otter
    from otter_surgery.analyze import Analysis
    from otter_surgery.capture import capture, is_transformers_model, vocab_size
    from otter_surgery.moe import _selects
    from otter_surgery.verify import bits_equal, reference_logits

    for dtype in (torch.float32, torch.bfloat16):
        try:
            model = make(dtype)
            masked = is_transformers_model(model)
            try:
                vocab = vocab_size(model)
            except otter.OtterError:
                vocab = 32  # (a decoder with its own embedding module and no config: any real vocabulary is larger)
            ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            mask[0, :3] = 0
            # a padded batch (transformers) or a full one, and one row of one token and of six (where kernels
            # pick other paths)
            rows = [ids[:1, :n] for n in (1, 6)]
            batches = [{"input_ids": ids, "attention_mask": mask} if masked else {"input_ids": ids}] + [
                {"input_ids": r, "attention_mask": torch.ones_like(r)} if masked else {"input_ids": r} for r in rows]
            try:
                want = [reference_logits(model, batch) for batch in batches]
            except Exception as exc:  # the model's own forward: nothing of ours has run yet
                row.note = f"the model itself fails in {str(dtype)[6:]}: {type(exc).__name__}: {str(exc)[:120]}"
                break
            if dtype == torch.float32:
                graph = capture(model).graph_module
                row.captured = True
                # routed experts: a value-dependent choice of indices in the graph (what moe.find_regions seeds on)
                row.moe = any(_selects(n) for n in graph.graph.nodes)
                step = Analysis(graph).heads_step()  # read off the graph, not the config
            omodel = otter.insert(model, otter.InsertSpec(extra_dim=4, extra_heads=step, extra_ffn=8))
            row.inserted = True
            row.strategy = omodel.capture_strategy
            row.leaves = len(omodel.leaves)
            if omodel.leaves and dtype == torch.float32:  # routing hidden inside a leaf is routing all the same
                row.moe = row.moe or _leaves_select(model, omodel.leaves, batches[0])
            with torch.no_grad():
                equal = all(bits_equal(omodel(**batch).logits, w) for batch, w in zip(batches, want))
            setattr(row, "fp32" if dtype == torch.float32 else "bf16", equal)
            if dtype == torch.float32:
                row.decodes, row.decode_note = (check_decoding(model, omodel, ids, mask) if masked
                                                else check_plain_decoding(model, omodel, ids))
        except Exception as exc:
            row.note = _describe(exc)
            break
    return row


def _leaves_select(model, leaves, batch) -> bool:
    """Whether a leaf module chooses among indices by value (torch.topk / sort / argsort, as a router does) when
    the model runs once eagerly: the MoE test of the graph (moe._selects), applied inside leaves."""
    import torch
    from torch.overrides import TorchFunctionMode

    from otter_surgery.verify import reference_logits

    inside, called = [0], set()

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if inside[0]:
                called.add(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1

    hooks = []
    for path in leaves:
        module = model.get_submodule(path)
        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with Record():
            reference_logits(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return bool(called & {"topk", "sort", "argsort"})


def check_plain_decoding(model, omodel, ids) -> tuple[bool, str]:
    """otter.generate == the decoder's own greedy loop (the whole sequence each step, argmax of the last
    position), 5 new tokens."""
    import torch

    import otter_surgery as otter
    from otter_surgery.verify import reference_logits

    try:
        got = otter.generate(omodel, ids, max_new_tokens=5).sequences
        want = ids
        with torch.no_grad():
            for _ in range(5):
                batch = {"input_ids": want}
                if omodel.takes_mask:
                    batch["attention_mask"] = torch.ones_like(want)
                logits = reference_logits(model, batch)
                last = logits[:, -1] if logits.dim() == 3 else logits  # (a decoder returning its last position)
                nxt = last.argmax(-1, keepdim=True)
                want = torch.cat([want, nxt], 1)
    except Exception as exc:
        return False, _describe(exc)
    return (True, "") if torch.equal(got, want) else (False, "greedy tokens differ from the decoder's own greedy loop")


def check_decoding(model, omodel, ids, mask) -> tuple[bool, str]:
    """otter.generate == model.generate(do_sample=False) on a padded and an unpadded batch, 5 new tokens. The
    comparison is plain greedy: processors a family's generation config switches on (blenderbot's forced EOS at
    max_length, repetition penalties) are off for transformers' side, as otter.generate does not apply them."""
    import torch

    import otter_surgery as otter

    # transformers merges the model's own generation config into any passed one, so the processors are
    # switched off there (on a copy, put back afterwards: the family's model is ours, built for this check)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    for name in PROCESSOR_FIELDS:
        setattr(model.generation_config, name, None)
    try:
        for m in (mask, torch.ones_like(mask)):
            got = otter.generate(omodel, ids, attention_mask=m, max_new_tokens=5).sequences
            try:
                with torch.no_grad():
                    want = model.generate(input_ids=ids, attention_mask=m, max_new_tokens=5, do_sample=False)
            except Exception as exc:
                # (a model on transformers' base classes with a cache of its own that this transformers'
                # generate no longer drives: minimind) the model's own greedy loop on the unpadded batch instead
                why = (f"transformers' own generate fails on this model ({type(exc).__name__}: {str(exc)[:80]}); "
                       "compared with the model's own greedy loop on the unpadded batch instead")
                good, note = check_plain_decoding(model, omodel, ids)
                return good, f"{why}: {note}" if note else why
            if not torch.equal(got, want):
                return False, f"greedy tokens differ from transformers' generate ({'padded' if not bool(m.all()) else 'unpadded'})"
    except Exception as exc:
        return False, _describe(exc)
    finally:
        model.generation_config = saved
    return True, ""


def _describe(exc: Exception) -> str:
    """A refusal (an OtterError, which names its node/module/field) as it is; anything else is a crash
    inside the engine, a bug to fix, and the note says so."""
    from otter_surgery.errors import OtterError

    text = f"{type(exc).__name__}: {str(exc)[:160]}"
    return text if isinstance(exc, OtterError) else "crash (not an OtterError): " + text


def _run_isolated(arch: str, timeout: float, check: str = "check_family") -> SupportRow:
    code = f"import json, dataclasses; from otter_surgery.support import {check}; " \
           f"print('ROW' + json.dumps(dataclasses.asdict({check}({arch!r}))))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return SupportRow(arch, note=f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("ROW"):
            return SupportRow(**json.loads(line[3:]))
    return SupportRow(arch, note=f"crashed: {proc.stderr.strip().splitlines()[-1][:160] if proc.stderr.strip() else proc.returncode}")


def causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def support_table(archs: list[str] | None = None, jobs: int = 2, timeout: float = 300,
                  decoders: list[str] = ()) -> list[SupportRow]:
    """Rows for the transformers families `archs` (default: every causal-LM family installed, unless only
    `decoders` are asked for) and the decoders outside transformers `decoders` (check_decoder's specs)."""
    archs = archs or ([] if decoders else causal_lm_families())
    jobs_list = [(a, "check_family") for a in archs] + [(d, "check_decoder") for d in decoders]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda job: _run_isolated(job[0], timeout, job[1]), jobs_list))


def markdown(rows: list[SupportRow]) -> str:
    yes = {True: "yes", False: "no"}
    lines = ["| family | captured | MoE | inserted | bit-identical fp32 | bit-identical bf16 | decodes (= generate) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = (r.note or r.decode_note).replace("|", "/").replace("\n", " ")
        note += f" (captured {r.strategy})" if r.strategy not in ("", "dynamic") else ""
        note += (f" ({r.leaves} module{'s' if r.leaves > 1 else ''} captured as leaves: Python branching on "
                 "tensor values, or a fast path export does not trace)") if r.leaves else ""
        lines.append(f"| {r.arch} | {yes[r.captured]} | {yes[r.moe] if r.captured else '?'} | {yes[r.inserted]} | {yes[r.fp32]} | {yes[r.bf16]} | "
                     f"{yes[r.decodes]} | {note} |")
    return "\n".join(lines)


def summary(rows: list[SupportRow]) -> dict:
    return {"families": len(rows), "captured": sum(r.captured for r in rows), "inserted": sum(r.inserted for r in rows),
            "bit_identical_fp32": sum(r.fp32 for r in rows), "bit_identical_bf16": sum(r.bf16 for r in rows),
            "decodes": sum(r.decodes for r in rows), "moe": sum(r.moe for r in rows),
            "moe_bit_identical": sum(r.moe and r.fp32 and r.bf16 for r in rows)}


def rows_to_json(rows: list[SupportRow]) -> str:
    return json.dumps({"summary": summary(rows), "rows": [asdict(r) for r in rows]}, indent=1)
