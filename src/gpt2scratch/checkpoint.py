"""Training checkpoints: one folder per saved step, written atomically, loaded without executing code.

    RUN/ckpt/step_000500/
        model.safetensors   the unwrapped model's weights (no `module.` / `_orig_mod.` prefixes; a tied head once)
        optimizer.pt        the optimizer's state dict (tensors and numbers only: loaded with weights_only=True)
        rng.pt              the torch RNG states of every rank (CPU and each CUDA device)
        state.json          step, resolved config, data-loader position, best val loss, metrics so far
        tokenizer/          vocab.json + merges.txt, so that the folder alone is enough to generate

A checkpoint is written into `.tmp-step_000500` and renamed when complete, so a kill during a save leaves
the previous checkpoints whole and no partial folder that `latest()` would pick.

`Checkpointer` is the training run's side of it: when to save, gathering the full state from every rank (DDP
or FSDP2), which checkpoints to keep, and restoring the latest for --resume.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2scratch.config import due
from gpt2scratch.models import cpu_matmul
from gpt2scratch.runtime import Runtime, barrier

CKPT_DIR = "ckpt"
_STEP_DIR = re.compile(r"step_(\d{6,})")
_TMP = ".tmp-"  # the prefix of a checkpoint folder being written


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which and why."""


@dataclass
class Checkpoint:
    path: Path
    state: dict  # the contents of state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:06d}"


def save(
    ckpt_root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    rng_states: list[dict],
    state: dict,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write one checkpoint atomically; returns its folder."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = step_dir(ckpt_root, step)
    tmp = ckpt_root / f"{_TMP}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_model_folder(tmp, model_state, {**state, "step": step}, tokenizer_dir)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_states, tmp / "rng.pt")
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
    except Exception as error:
        if not _out_of_space(error, ckpt_root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the earlier checkpoints are whole
        raise CheckpointError(
            f"cannot write the checkpoint {final}: No space left on device; free some space in {ckpt_root} "
            "(or keep fewer checkpoints: --keep-last), then --resume"
        ) from None
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    return final


def _out_of_space(error: Exception, folder: Path) -> bool:
    """Whether a failed write ran out of disk space: the libraries say so in different ways (an OSError,
    safetensors' "No space left", torch's zip writer's "unexpected pos"), so the disk is asked too."""
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def write_model_folder(
    path: str | Path, model_state: dict[str, torch.Tensor], state: dict, tokenizer_dir: str | Path | None
) -> None:
    """What inference needs, in `path`: model.safetensors, state.json (with the config) and tokenizer/."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_untie(model_state), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    if tokenizer_dir is not None:
        (path / "tokenizer").mkdir(exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(Path(tokenizer_dir) / name, path / "tokenizer" / name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def remove_checkpoints(ckpt_root: str | Path) -> None:
    """Delete the checkpoints under ckpt_root (complete ones and a save's leftover .tmp- folder), and nothing else
    (the repository's ckpt/README.md, a user's own files)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return
    for path in ckpt_root.iterdir():
        name = path.name.removeprefix(_TMP)
        if path.is_dir() and not path.is_symlink() and _STEP_DIR.fullmatch(name):
            shutil.rmtree(path)


def latest(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def read_state(path: str | Path) -> Checkpoint:
    """Read a checkpoint's state.json (cheap: no tensors)."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no state.json)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{state_file} is corrupt ({error or 'nested too deeply'})") from None
    expect_fields(state, {"step": int, "config": dict}, state_file)
    return Checkpoint(path, state)


def expect_fields(state, fields: dict[str, type | tuple[type, ...]], source: Path) -> None:
    """Each field present with its type (a hand-edited or damaged file says so here, not with a KeyError later)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} is not a JSON object")
    for name, kind in fields.items():
        value = state.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise CheckpointError(f"{source}: field '{name}' is missing or of the wrong type ({type(value).__name__})")


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no shared tensors: drop a tied LM head (load_model_state re-creates it)."""
    state = dict(state)
    head, wte = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    if head is not None and wte is not None and head.data_ptr() == wte.data_ptr():
        del state["lm_head.weight"]
    # A copy with storage of its own: what FSDP's full state dict returns may not expose its storage.
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def safetensors_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the file's header alone (nothing is allocated)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as reader:
            return {key: tuple(reader.get_slice(key).get_shape()) for key in reader.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{file} is truncated or corrupt ({_first_line(error)})") from None


def check_config_fits(config, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """The config describes the weights (vocabulary, width, context, depth), so that building the model allocates
    what the weights file holds and no more: a config.json that says 200,000 layers next to weights of 2 is
    refused before anything is built."""
    layers = {
        int(key.split(".")[2]) for key in shapes if key.startswith("transformer.h.") and key.split(".")[2].isdigit()
    }
    found = {
        "vocab_size": shapes.get("transformer.wte.weight", (None, None))[0],
        "emb_dim": shapes.get("transformer.wte.weight", (None, None))[-1],
        "context_length": shapes.get("transformer.wpe.weight", (None, None))[0],
        "n_layers": len(layers),
    }
    wrong = [
        f"{name} {getattr(config, name)} (the weights: {value})"
        for name, value in found.items()
        if getattr(config, name) != value
    ]
    if wrong:
        raise CheckpointError(f"{source}: the config does not describe its weights: {', '.join(wrong)}")


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint folder (a tied LM head is the token embedding again)."""
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{file} is truncated or corrupt ({_first_line(error)})") from None
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _first_line(error: Exception) -> str:
    """Library errors can run to a page (torch.load's does): the first line says what happened."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_tensors(path: str | Path, name: str):
    """optimizer.pt or rng.pt, with weights_only=True: never executes code from the file."""
    file = Path(path) / name
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(f"{file} is truncated or corrupt ({_first_line(error)})") from None


def prune(ckpt_root: str | Path, keep_last: int, keep: set[int]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those whose step is in `keep` (e.g. the best)."""
    found = list_checkpoints(ckpt_root)
    for path in found[:-keep_last] if keep_last else found:
        if int(_STEP_DIR.fullmatch(path.name).group(1)) not in keep:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# A training run's checkpoints.


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, unwrapped (a collective under FSDP: call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Checkpointer:
    """Saves a run every `save_every` steps and at its last, keeps the newest `keep_last` and the best by val
    loss, and restores the latest one for --resume: weights, optimizer, gradient scaler, and every rank's RNG and
    CPU matmul plans (models/cpu_matmul.py). The trainer's own state (step, loader position, best val loss, ...)
    travels in state.json."""

    def __init__(self, run_dir: str | Path, runtime: Runtime, save_every: int, keep_last: int, tokenizer_dir: Path):
        self.root = Path(run_dir) / CKPT_DIR
        self.runtime = runtime
        self.save_every, self.keep_last = save_every, keep_last
        self.tokenizer_dir = tokenizer_dir

    def due(self, step: int, last: bool) -> bool:
        return due(self.save_every, step, last)

    def save(self, step: int, model, optimizer, scaler, state: dict, best_step: int | None) -> None:
        """Write step `step` (a collective: every rank calls it; rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = full_model_state(model)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if scaler.is_enabled():
            optimizer_state = {**optimizer_state, "grad_scaler": scaler.state_dict()}
        rng = {"cpu": torch.get_rng_state(), "matmul_plans": cpu_matmul.plans()}  # (plans: they round too)
        if self.runtime.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        rng_states = [rng]
        if self.runtime.distributed:
            import torch.distributed as dist

            rng_states = [None] * self.runtime.world_size
            dist.all_gather_object(rng_states, rng)
        if self.runtime.is_main:
            save(self.root, step, model_state, optimizer_state, rng_states, state, self.tokenizer_dir)
            prune(self.root, self.keep_last, {best_step} if best_step is not None else set())
        barrier()

    def find(self, path: str | Path | None = None) -> Checkpoint:
        """The checkpoint to resume: `path`, or the latest in the run folder."""
        if path is None:
            path = latest(self.root)
            if path is None:
                raise ValueError(f"--resume: no checkpoint in {self.root}; start without --resume")
        try:
            ckpt = read_state(path)
            resumed = {"tokens_per_step": int, "loader": dict, "history": list, "best_step": (int, type(None))}
            expect_fields(ckpt.state, resumed, ckpt.path / "state.json")
            return ckpt
        except CheckpointError as error:
            raise self._with_earlier(error, Path(path)) from None

    def restore(self, ckpt: Checkpoint, model, optimizer, scaler) -> None:
        """Load a checkpoint's weights, optimizer, scaler and this rank's RNG into the run; a damaged file, or
        weights that do not fit the model (a tensor missing, another shape), stop the resume before anything
        is loaded, naming an earlier checkpoint to resume instead."""
        try:
            self._restore(ckpt, model, optimizer, scaler)
        except CheckpointError as error:
            raise self._with_earlier(error, ckpt.path) from None

    def _restore(self, ckpt: Checkpoint, model, optimizer, scaler) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        weights = load_model_state(ckpt.path)
        check_weights(weights, {name: tuple(t.shape) for name, t in model.state_dict().items()}, ckpt.path)
        set_model_state_dict(model, weights, options=options)
        optimizer_state = load_tensors(ckpt.path, "optimizer.pt")
        scaler_state = optimizer_state.pop("grad_scaler", None)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        if scaler.is_enabled() and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        rng_states = load_tensors(ckpt.path, "rng.pt")
        rank = self.runtime.rank
        rng = rng_states[rank] if rank < len(rng_states) else rng_states[0]
        torch.set_rng_state(rng["cpu"])
        cpu_matmul.set_plans(rng.get("matmul_plans", {}))
        if "cuda" in rng and self.runtime.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.runtime.device)

    def _with_earlier(self, error: CheckpointError, path: Path) -> CheckpointError:
        """The error, with the checkpoint to resume instead (the newest one older than `path`)."""
        match = _STEP_DIR.fullmatch(path.name)
        step = int(match.group(1)) if match else 1 << 62
        earlier = [p for p in list_checkpoints(path.parent) if int(_STEP_DIR.fullmatch(p.name).group(1)) < step]
        hint = f"--resume {earlier[-1]}" if earlier else "--overwrite (there is no earlier checkpoint)"
        return CheckpointError(f"{error}; resume from an earlier checkpoint instead: {hint}")


def check_weights(weights: dict[str, torch.Tensor], expected: dict[str, tuple], source: Path) -> None:
    """The weights hold exactly the tensors `expected` names, with those shapes; else say which do not fit."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    reshaped = [
        f"{k} {tuple(weights[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in weights and tuple(weights[k].shape) != expected[k]
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
            if items
        ]
        raise CheckpointError(f"{source}/model.safetensors does not fit the model ({'; '.join(problems)})")
