"""One training run, from what a user asks for to a trained model folder: what `gpt2scratch train` and
`python main.py` do, as a library function.

    result = train(TrainOptions(out="runs/x"), preset="auto", overrides={"training": {"max_steps": 100}})

In order: the preset (`auto`: the `gpu` preset on a GPU, the `cpu` preset on a CPU), the config (defaults <
preset < config file < overrides; on --resume the checkpoint's, with the overrides on top), the run folder
(refused if it holds an earlier run, unless --resume or --overwrite), the weights to start from (--init-from),
the data (the embedded corpus prepared on first use; the model's vocabulary fitted to the data's tokenizer),
the time budget, the loop (trainer.py), and at the end the Hugging Face export (RUN/hf).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2scratch import checkpoint
from gpt2scratch.config import Config, GPTConfig, Sampling, TrainingConfig, load_config_file, merge, resolve_config
from gpt2scratch.dataset.data_module import DataModule, prepare
from gpt2scratch.dataset.shards import MANIFEST, read_manifest
from gpt2scratch.metrics import METRICS_FILE, PLOT_FILE
from gpt2scratch.options import LATEST, PrepareOptions, TrainOptions
from gpt2scratch.runtime import available_memory, barrier, close_distributed, pick_device, setup_runtime

log = logging.getLogger(__name__)

CPU_TOKENIZER = "bpe:4096"  # the CPU default: see the README's "The default run"
RUN_FILES = (METRICS_FILE, PLOT_FILE, "run_config.json")  # what --overwrite removes beside the checkpoints


@dataclass
class TrainResult:
    step: int
    minutes: float
    interrupted: bool
    val_loss: float | None
    val_bpb: float | None
    ckpt_dir: Path
    hf_dir: Path | None  # None when interrupted, and on ranks other than 0
    exported_step: int | None = None  # whose weights hf_dir holds: the best step's after an early stop


def train(
    options: TrainOptions,
    preset: str | None = "auto",
    config_file: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> TrainResult:
    """Resolve the run, train it, export it; see the module docstring."""
    from gpt2scratch.budget import TimeBudget
    from gpt2scratch.trainer import Trainer

    overrides = {section: dict(values) for section, values in (overrides or {}).items()}
    if options.out:
        overrides.setdefault("training", {})["save_path"] = options.out
    resume_from = None  # the checkpoint --resume names (None: the run's latest)
    if options.resume:
        if options.resume != LATEST:
            resume_from = Path(options.resume)
            if not (resume_from / "state.json").is_file():
                raise ValueError(f"--resume {resume_from}: not a checkpoint folder (no state.json in it)")
            if not options.out:  # RUN/ckpt/step_N: the run it belongs to
                overrides.setdefault("training", {})["save_path"] = str(resume_from.parent.parent)
        ckpt_root = _run_dir(config_file, overrides) / checkpoint.CKPT_DIR
        source = resume_from or checkpoint.latest(ckpt_root)
        if source is None:
            raise ValueError(f"--resume: no checkpoint in {ckpt_root}; start without --resume")
        # The checkpoint's config (not the preset's), with what the command line says on top (e.g. --max-steps).
        config = merge(Config.from_dict(checkpoint.read_state(source).state["config"]), overrides, "command line")
    else:
        config = resolve_config(_preset(preset, options, overrides), config_file, overrides)
    run_dir = Path(config.training.save_path)
    ckpt_root = run_dir / checkpoint.CKPT_DIR
    latest = checkpoint.latest(ckpt_root)
    if latest is not None and not options.resume and not options.overwrite:
        raise ValueError(
            f"{ckpt_root} holds checkpoints of an earlier run (latest: {latest.name}); pass --resume to continue "
            "it, --overwrite to start over (deletes them), or --out to train elsewhere"
        )
    init = None
    if options.init_from and not options.resume:
        init = _load_init(options.init_from, overrides)
        config = dataclasses.replace(config, model=init.config.model)
    runtime = setup_runtime(config.training)
    logging.getLogger().setLevel(logging.INFO if runtime.is_main else logging.WARNING)
    try:
        if runtime.is_main and options.overwrite and not options.resume:
            checkpoint.remove_checkpoints(ckpt_root)
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
        config = _resolve_data(config, runtime)
        t = config.training
        data = DataModule(
            config.data.dir, config.model.context_length, t.batch_size, t.seed, runtime.rank, runtime.world_size
        )
        explicit_vocab = init is not None or bool(options.resume) or "vocab_size" in overrides.get("model", {})
        config = _fit_vocabulary(config, data.vocab_size, explicit=explicit_vocab)
        if init is not None:
            _check_same_tokenizer(init.tokenizer_dir, data.tokenizer_dir(), options.init_from, config.data.dir)
        if runtime.is_main and not options.resume:
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
        _check_fits_in_memory(config, runtime)
        init_weights = init.model.state_dict() if init is not None else None
        resume = (resume_from or True) if options.resume else False
        trainer = Trainer(config, run_dir, runtime, data, resume=resume, init_weights=init_weights)
        budget = None
        if t.time_budget and not options.resume:
            budget = TimeBudget.calibrate(trainer, t.time_budget)
        summary = trainer.fit(budget)
        hf_dir, exported_step = None, summary["step"]
        if not summary["interrupted"]:
            model_state = checkpoint.full_model_state(trainer.raw_model)  # every rank takes part (FSDP gathers)
            if runtime.is_main:
                best = trainer.best_checkpoint()
                if best is not None:  # an early stop: the weights before the evaluations that did not improve
                    model_state, exported_step = checkpoint.load_model_state(best), trainer.best_step
                    log.info(
                        f"exporting the best weights: step {trainer.best_step} (val loss {trainer.best_val_loss:.4f}), "
                        f"not the last step's ({summary['step']}); its checkpoint is {best}"
                    )
                hf_dir = _export(trainer, model_state, run_dir / "hf")
            barrier()  # the ranks take the process group down together, not while rank 0 still exports
    finally:
        close_distributed()
    return TrainResult(
        step=summary["step"],
        minutes=summary["minutes"],
        interrupted=summary["interrupted"],
        val_loss=summary.get("val_loss"),
        val_bpb=summary.get("val_bpb"),
        ckpt_dir=ckpt_root,
        hf_dir=hf_dir,
        exported_step=exported_step,
    )


def _run_dir(config_file: str | Path | None, overrides: dict) -> Path:
    """The run folder of a resumed run: --out, else the config file's save_path, else the default."""
    from_file = load_config_file(config_file).get("training", {}) if config_file else {}
    return Path(
        overrides.get("training", {}).get("save_path") or from_file.get("save_path") or TrainingConfig.save_path
    )


def _check_fits_in_memory(config: Config, runtime) -> None:
    """Refuse, before building it, a model whose weights, gradients and AdamW state alone exceed the free memory
    (a config file that says n_layers 200000 would otherwise allocate until the machine gives out)."""
    from gpt2scratch.estimates import n_params

    available = available_memory(runtime.device)
    params = n_params(config.model)
    need = 16 * params // (runtime.world_size if config.training.fsdp else 1)  # fp32 weights, grads, 2 moments
    if available is not None and need > available:
        raise ValueError(
            f"the model has {params:,} parameters: its weights, gradients and AdamW state need "
            f"{need / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB free on {runtime.device}; "
            "choose a smaller model (`gpt2scratch info` shows the sizes)"
        )


def _preset(preset: str | None, options: TrainOptions, overrides: dict) -> str | None:
    """`auto`: the `gpu` preset on a GPU, the `cpu` preset elsewhere (each sized for the embedded corpus and a
    few minutes); fine-tuning: no preset, the model's shape and the seed's recipe."""
    if preset != "auto":
        return preset
    if options.init_from:
        return None
    device, _ = pick_device(overrides.get("training", {}).get("device", "auto"))
    return "gpu" if device.type == "cuda" else "cpu"


def _load_init(source: str, overrides: dict):
    """The model to fine-tune; its shape wins, and a shape flag that contradicts it is an error."""
    from gpt2scratch import loading

    init = loading.load(source)
    for key, value in overrides.get("model", {}).items():
        if key != "drop_rate" and getattr(init.config.model, key) != value:
            raise ValueError(
                f"--init-from {source}: the model has {key}={getattr(init.config.model, key)}, the command line "
                f"says {value}; the shape comes from the model (only --drop-rate may change)"
            )
    if "drop_rate" in overrides.get("model", {}):
        model = dataclasses.replace(init.config.model, drop_rate=overrides["model"]["drop_rate"])
        init.config = dataclasses.replace(init.config, model=model)
    log.info(f"initialising from {init.source} ({init.model.num_params():,} parameters)")
    return init


def _check_same_tokenizer(model_tokenizer: Path, data_tokenizer: Path, source: str, data_dir: str) -> None:
    from gpt2scratch.dataset.tokenizer import file_sha256

    for name in ("vocab.json", "merges.txt"):
        if file_sha256(model_tokenizer / name) != file_sha256(data_tokenizer / name):
            raise ValueError(
                f"{data_dir} was tokenized with another tokenizer than {source} uses; prepare the data with the "
                f"model's tokenizer (for GPT-2 models: gpt2scratch prepare ... --tokenizer gpt2)"
            )


def _resolve_data(config: Config, runtime) -> Config:
    """data.dir/tokenizer `auto`: the embedded corpus, GPT-2's tokenizer on a GPU, a small BPE on a CPU;
    prepared on first use (by rank 0 while the others wait). The folder is made absolute, so that `eval` of a
    checkpoint finds it from any folder."""
    directory = config.data.dir
    if directory != "auto":  # a prepared folder: its manifest says which tokenizer it has
        tokenizer = read_manifest(directory)["tokenizer"]["name"]
    else:
        tokenizer = config.data.tokenizer
        if tokenizer == "auto":
            tokenizer = "gpt2" if runtime.device.type == "cuda" else CPU_TOKENIZER
        directory = "data/shakespeare" if tokenizer == "gpt2" else f"data/shakespeare-{tokenizer.replace(':', '')}"
        if not (Path(directory) / MANIFEST).is_file() and runtime.is_main:
            log.info(f"preparing the embedded Shakespeare corpus in {directory} (tokenizer {tokenizer})")
            prepare([], directory, PrepareOptions(tokenizer=tokenizer))
        barrier()
    data = dataclasses.replace(config.data, dir=str(Path(directory).resolve()), tokenizer=tokenizer)
    return dataclasses.replace(config, data=data)


def _fit_vocabulary(config: Config, data_vocab: int, explicit: bool) -> Config:
    """The model's vocabulary follows the data's tokenizer unless set on purpose (it may be larger: padding)."""
    model_vocab = config.model.vocab_size
    if model_vocab == data_vocab or (explicit and model_vocab > data_vocab):
        return config
    if explicit or model_vocab < data_vocab and model_vocab != GPTConfig().vocab_size:
        raise ValueError(
            f"vocab_size ({model_vocab}) is smaller than the data's tokenizer ({data_vocab} tokens); "
            f"use --vocab-size {data_vocab} or more"
        )
    log.info(f"vocab_size set to {data_vocab}, the data's tokenizer")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=data_vocab))


def _export(trainer, model_state: dict, out_dir: Path) -> Path:
    from gpt2scratch.hf import export_folder

    config = trainer.run_config()
    sampling = Sampling.from_training(config.training)
    return export_folder(model_state, config.model, trainer.data.tokenizer_dir(), out_dir, sampling)
