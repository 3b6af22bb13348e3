"""Sharded checkpoints of a torchrun job (``torch.distributed.checkpoint``), resumable on any world size
or mesh, and their consolidation into one Hugging Face checkpoint.

    RUN_DIR/checkpoints/step-00000500/
        sharded/            DCP: every rank writes its own shards of model + AdamW state; .metadata last
        model/              config.json (+ generation_config.json, tokenizer.json): no weights — `moelab
                            export` fills them in
        train_state.pt      step, tokens, RNG and balancer state (rank 0; read with weights_only=True)
        meta.json           step, tokens, time, world, dp, ep, weights dtype, "sharded": true

Every tensor is saved under its **global** shape, so any layout can read it back (DCP reshards on load):
FSDP2 parameters are DTensors already; routed experts under expert parallelism — a rank holds rows
``[ep_rank·E/ep, …)`` of the stacked ``[E, ·, ·]`` tensors, and FSDP shards those over dp — are
re-described as DTensors over an (ep, dp) view of the ranks with placements ``[Shard(0), Shard(0)]``
(FSDP) or ``[Shard(0), Replicate()]`` (DDP). The re-description shares storage, so DCP loads in place.

Atomic: all ranks write into ``.tmp-step-N``; rank 0 renames it to ``step-N`` only after every rank has
finished (a barrier) and ``.metadata`` exists, so a step directory appears only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from moelab.dist.coord import agreed, on_main
from moelab.dist.mesh import ParallelState
from moelab.dist.wrap import is_expert_param
from moelab.errors import CheckpointError
from moelab.interop.checkpoint import copy_tokenizer, write_config_files

SHARDED = "sharded"


def is_sharded(ckpt: Path) -> bool:
    """Whether ``ckpt`` (a ``step-N`` directory) was written by :func:`save_sharded`."""
    return (Path(ckpt) / SHARDED / ".metadata").is_file()


def _expert_mesh(ps: ParallelState):
    """The ranks as an (ep, dp) mesh: ``mesh[e, d]`` holds experts block e, dp shard d (built once)."""
    if getattr(ps, "_expert_mesh", None) is None:
        from torch.distributed.device_mesh import DeviceMesh

        ranks = torch.arange(ps.world).view(ps.dp, ps.ep).t()
        ps._expert_mesh = DeviceMesh(ps.device.type, ranks, mesh_dim_names=("ep_of_experts", "dp_of_experts"))
    return ps._expert_mesh


def _globalize(sd: dict, ps: ParallelState, n_experts: int) -> dict:
    """A copy of the (flat, FQN-keyed) state dict ``sd`` with routed-expert tensors under expert
    parallelism re-described by their global shape ``[E, …]`` (storage shared)."""
    if not ps.distributed or ps.ep == 1:
        return sd
    mesh = _expert_mesh(ps)
    placements = [Shard(0), Shard(0)] if ps.data_parallel == "fsdp" else [Shard(0), Replicate()]
    out = {}
    for k, t in sd.items():
        if isinstance(t, torch.Tensor) and t.dim() == 3 and is_expert_param(k.split("/")[0]):
            local = t.to_local() if isinstance(t, DTensor) else t
            n_local = t.shape[0]                                  # E/ep (the DTensor's global shape over dp)
            shape = (n_local * ps.ep, *t.shape[1:])
            assert shape[0] == n_experts, (k, shape, n_experts)
            stride = torch.empty(shape, device="meta").stride()
            t = DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)
        out[k] = t
    return out


def _flat_optim(osd: dict) -> tuple[dict, dict]:
    """The optimizer state as ``{"fqn/exp_avg": tensor}`` (what :func:`_globalize` reads), and the rest."""
    flat = {f"{fqn}/{name}": v for fqn, st in osd["state"].items() for name, v in st.items()}
    return flat, {"param_groups": osd["param_groups"]}


def _unflat_optim(flat: dict, rest: dict) -> dict:
    state: dict = {}
    for key, v in flat.items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = v
    return {"state": state, **rest}


def _state(model, optimizer, ps: ParallelState) -> tuple[dict, dict]:
    """(the DCP state dict with global shapes, the flat optimizer state it re-describes)."""
    opts = StateDictOptions(full_state_dict=False)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    flat, rest = _flat_optim(osd)
    E = model.config.n_routed_experts or 0
    return {"model": _globalize(msd, ps, E), "optim": _globalize(flat, ps, E), "optim_groups": rest}, flat


def save_sharded(run_dir: Path, step: int, model, optimizer, ps: ParallelState, state: dict, keep_last: int,
                 tokenizer: Path | None = None) -> Path:
    """Write ``RUN_DIR/checkpoints/step-N`` from every rank (a collective); returns its path. ``state``:
    the run's small state (tokens, balancer, job), saved by rank 0 with the step and RNG state."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDED).mkdir(parents=True)

    on_main(ps, prepare)
    to_save, _ = _state(model, optimizer, ps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # DCP's notes on its own defaults
        dcp.save(to_save, checkpoint_id=tmp / SHARDED)
    ps.barrier()

    def commit():
        if not is_sharded(tmp):
            raise CheckpointError(f"the sharded save of step {step} did not complete ({tmp} has no .metadata)")
        dtype = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
        (tmp / "model").mkdir()
        write_config_files(model.config, dtype, tmp / "model")
        if tokenizer is not None and Path(tokenizer).is_file():
            copy_tokenizer(Path(tokenizer), tmp / "model")
        torch.save({"step": step, "torch_rng": torch.get_rng_state(), **state}, tmp / "train_state.pt")
        meta = {"step": step, "tokens": state.get("tokens", 0), "time": time.time(), "sharded": True,
                "world": ps.world, "dp": ps.dp, "ep": ps.ep, "data_parallel": ps.data_parallel, "dtype": dtype}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    on_main(ps, commit)
    return final


def load_sharded(ckpt: Path, model, optimizer, ps: ParallelState) -> dict:
    """Load a sharded checkpoint into this rank's shards of ``model`` and ``optimizer`` (a collective;
    any world size or mesh); returns the saved run state (step, tokens, balancer, job)."""
    ckpt = Path(ckpt)
    to_load, flat = _state(model, optimizer, ps)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(to_load, checkpoint_id=ckpt / SHARDED)
    except (Exception, CheckpointException) as e:   # a missing tensor or a shape that does not fit (DCP raises a BaseException)
        first = str(e).strip().splitlines()
        raise agreed(CheckpointError(   # DCP raises on every rank alike: rank 0 says it
            f"cannot resume from {ckpt}: its sharded state does not fit this model "
            f"({first[-1] if first else type(e).__name__}). Resume with the config that wrote it")) from None
    # param groups (lr, betas, ...) come back as loaded objects; the tensors were loaded in place
    set_optimizer_state_dict(model, optimizer, _unflat_optim(flat, to_load["optim_groups"]),
                             options=StateDictOptions(full_state_dict=False))
    state = read_run_state(ckpt)
    torch.set_rng_state(state.pop("torch_rng"))
    return state


def read_run_state(ckpt: Path) -> dict:
    """``train_state.pt`` of a checkpoint (sharded or not), read with ``weights_only=True`` (never unpickled)."""
    path = Path(ckpt) / "train_state.pt"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = None
    if not isinstance(state, dict) or not {"step", "torch_rng"} <= state.keys():
        raise CheckpointError(f"cannot resume from {ckpt}: {path.name} is not a training state written by moelab "
                              "(damaged or replaced; it was not unpickled). Move this step directory out of "
                              "checkpoints/ to resume from the one before")
    return state


def gather_full_model(ckpt: Path, device: str = "cpu"):
    """The whole model of a sharded checkpoint, in one process (no process group needed)."""
    from moelab.interop.hf_config import read_config_json
    from moelab.model.transformer import DeepSeekForCausalLM

    ckpt = Path(ckpt)
    if not is_sharded(ckpt):
        raise CheckpointError(f"{ckpt} is not a sharded moelab checkpoint (no {SHARDED}/.metadata); a one-process "
                              f"run's checkpoint already holds a Hugging Face checkpoint in {ckpt / 'model'}")
    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = read_config_json(ckpt / "model")
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    model.to(getattr(torch, meta.get("dtype", "float32"))).to_empty(device=device)
    load_model_state(ckpt, model)
    model.reset_buffers()
    return model.eval()


def load_model_state(ckpt: Path, model) -> None:
    """Read the tensors of ``model``'s state dict (all of them must be in the checkpoint) from a sharded
    checkpoint, in one process and in place; e.g. a base model with LoRA applied gets its trained adapters."""
    with warnings.catch_warnings():     # in place: state_dict()'s tensors are the model's own
        warnings.simplefilter("ignore")
        dcp.load({"model": model.state_dict()}, checkpoint_id=Path(ckpt) / SHARDED, no_dist=True)


def export(ckpt: Path, out: Path, overwrite: bool = True) -> Path:
    """Consolidate a sharded checkpoint into a Hugging Face checkpoint directory ``out`` (atomic)."""
    from moelab.interop.checkpoint import save

    ckpt = Path(ckpt)
    model = gather_full_model(ckpt)
    tok = ckpt / "model" / "tokenizer.json"
    return save(model, out, tokenizer=tok if tok.is_file() else None, overwrite=overwrite)


__all__ = ["export", "gather_full_model", "is_sharded", "load_model_state", "load_sharded", "read_run_state",
           "save_sharded"]
