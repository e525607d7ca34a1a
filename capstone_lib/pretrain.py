"""Pretraining a Pythia-architecture GPT from random weights with LitGPT, and the hand-off.

LitGPT does the training; this module prepares its inputs (corpus, tokenizer, model
config, command line), runs ``litgpt pretrain`` in a subprocess, reads its outputs (the
CSV log, the checkpoints) and converts the final checkpoint, with LitGPT's own converter,
into a Hugging Face ``transformers`` directory (``runs/<profile>/pretrain/hf/``).

Why a subprocess: LitGPT's Python entry point re-parses ``sys.argv`` when it saves its
hyper-parameters, which fails inside Jupyter; the CLI is LitGPT's supported interface.

Scale-out: the profile's ``devices``/``num_nodes`` go to ``--devices``/``--num_nodes``;
LitGPT's Fabric launcher starts one process per GPU and shards with FSDP on its own. On a
multi-node cluster run the same command (``pretrain_command(profile, ...)``) on every node
with ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` set (or under ``srun`` on SLURM).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .fileio import write_json_atomic
from .profiles import REPO_ROOT, Profile
from .tokenizer import prepare_tokenizer

# The earlier write-up's LitGPT log (pythia-160m on RedPajama, a 24 GB GPU, micro-batch 4).
EARLIER_WRITEUP = {"model": "pythia-160m", "micro_batch_size": 4, "block_size": 2048,
                   "ms_per_iter": 650.0, "first_loss": 10.98, "loss_after_600_iters": 6.14}
_ITER_RE = re.compile(r"iter (\d+) step (\d+) \| loss train: ([\d.]+), val: ([\w./]+)")
_VAL_RE = re.compile(r"iter (\d+): val loss ([\d.]+)")
_FINAL_RE = re.compile(r"Final evaluation \| val loss: ([\d.]+)")


class PretrainError(RuntimeError):
    """LitGPT failed; the message holds the command's last log lines."""


@dataclass(frozen=True)
class PretrainPaths:
    """Where the pretraining stage keeps its files (``runs/<profile>/pretrain/``)."""

    root: Path

    @property
    def lit(self) -> Path:
        """LitGPT's ``--out_dir``: ``step-XXXXXXXX/`` checkpoints, ``final/``, ``logs/csv/``."""
        return self.root / "lit"

    @property
    def tokenizer(self) -> Path:
        """The tokenizer directory (trained locally or downloaded)."""
        return self.root / "tokenizer"

    @property
    def tokens(self) -> Path:
        """Cache of tokenized corpora (``.npy``)."""
        return self.root / "tokens"

    @property
    def hf(self) -> Path:
        """The converted Hugging Face model (the hand-off to notebooks 03-05)."""
        return self.root / "hf"

    @property
    def log(self) -> Path:
        """Everything LitGPT printed, appended run after run."""
        return self.root / "train.log"

    @property
    def summary(self) -> Path:
        """What the runs measured (initial/final val loss, timings)."""
        return self.root / "summary.json"


def pretrain_paths(profile: Profile) -> PretrainPaths:
    """The pretraining paths of a profile."""
    return PretrainPaths(profile.run_dir / "pretrain")


# ----------------------------------------------------------------------------- inputs
def data_root() -> Path:
    """Where downloads go: ``$CAPSTONE_DATA_DIR`` (e.g. on Google Drive), else the repo's ``data/``."""
    env = os.environ.get("CAPSTONE_DATA_DIR")
    return Path(env) if env else REPO_ROOT / "data"


def corpus_paths(profile: Profile) -> tuple[Path, Path | None]:
    """``(train, val)`` jsonl corpus: ShapesWorld on cpu/smoke, a RedPajama sample on GPU profiles.

    ``val`` is ``None`` when the validation tokens are held out from the training corpus.
    """
    if profile.data.source == "shapesworld":
        from .shapesworld import ensure_shapesworld
        sw = ensure_shapesworld(profile)
        return sw.corpus_train, sw.corpus_val
    if profile.data.redpajama_dir:
        return Path(profile.data.redpajama_dir), None
    p = profile.pretrain
    return download_redpajama_sample(data_root() / "redpajama-sample", p.redpajama_repo, p.redpajama_files), None


def download_redpajama_sample(dest: str | Path, repo_id: str = "togethercomputer/RedPajama-Data-1T-Sample",
                              files: Sequence[str] | None = None) -> Path:
    """Download jsonl files of a RedPajama sample into ``dest`` (interrupted downloads resume).

    With ``files`` named, only those are fetched (no listing call, so a local hub cache works
    offline); without, every ``.jsonl`` file the dataset lists.
    """
    from huggingface_hub import hf_hub_download, list_repo_files

    dest = Path(dest)
    if files and all((dest / f).is_file() for f in files):
        return dest
    wanted = list(files) if files else [f for f in list_repo_files(repo_id, repo_type="dataset")
                                        if f.endswith(".jsonl")]
    for name in wanted:
        hf_hub_download(repo_id, name, repo_type="dataset", local_dir=str(dest))
    return dest


def ensure_tokenizer(profile: Profile) -> Path:
    """The tokenizer directory: a BPE trained on the corpus (cpu/smoke) or the hub one (GPU)."""
    from .redpajama import iter_jsonl_texts, jsonl_files

    p, paths = profile.pretrain, pretrain_paths(profile)
    if p.tokenizer != "train":
        return prepare_tokenizer(p.tokenizer, paths.tokenizer)
    files = jsonl_files(corpus_paths(profile)[0])
    corpus_id = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    texts = (t for f in files for t in iter_jsonl_texts(f))
    return prepare_tokenizer("train", paths.tokenizer, texts, p.vocab_size,
                             model_max_length=lit_config(profile).block_size, corpus_id=str(corpus_id))


def lit_config(profile: Profile):
    """The ``litgpt.Config`` of the profile: a named config, or the custom dict (Pythia-style)."""
    from litgpt import Config

    p = profile.pretrain
    if not p.model_config:
        return Config.from_name(p.model_name)
    cfg = dict(p.model_config)
    cfg.setdefault("vocab_size", p.vocab_size)
    cfg.setdefault("padded_vocab_size", p.vocab_size)
    return Config(name=p.model_name, **cfg)


def _model_config_arg(profile: Profile) -> str | None:
    p = profile.pretrain
    if not p.model_config:
        return None
    cfg = {"name": p.model_name, "vocab_size": p.vocab_size, "padded_vocab_size": p.vocab_size,
           **dict(p.model_config)}
    return json.dumps(cfg)


def tokens_per_iter(profile: Profile) -> int:
    """Tokens in one micro-batch on one device (LitGPT's unit for ``iter``)."""
    return profile.pretrain.micro_batch_size * lit_config(profile).block_size


def pretrain_command(profile: Profile, train: Path, val: Path | None, tokenizer_dir: Path,
                     max_tokens: int | None = None, resume: bool = True) -> list[str]:
    """The ``litgpt pretrain`` command line for this profile."""
    p, paths = profile.pretrain, pretrain_paths(profile)
    optimizer = {"class_path": "torch.optim.AdamW",
                 "init_args": {"lr": p.lr, "weight_decay": p.weight_decay, "betas": [0.9, 0.95]}}
    cmd = [sys.executable, "-m", "litgpt", "pretrain", p.model_name]
    if (cfg := _model_config_arg(profile)) is not None:
        cmd += ["--model_config", cfg]
    cmd += [
        "--out_dir", str(paths.lit), "--precision", p.precision,
        "--resume", "auto" if resume else "false",
        "--tokenizer_dir", str(tokenizer_dir),
        "--data", "capstone_lib.lit_data.JsonlText", "--data.train_path", str(train),
        "--data.cache_dir", str(paths.tokens), "--data.seed", str(profile.runtime.seed),
        "--train.max_tokens", str(int(max_tokens or p.max_tokens)),
        "--train.micro_batch_size", str(p.micro_batch_size),
        "--train.global_batch_size", str(p.global_batch_size),
        "--train.lr_warmup_steps", str(p.warmup_steps), "--train.min_lr", str(p.min_lr),
        "--train.max_norm", "1.0", "--train.tie_embeddings", "false",
        "--train.save_interval", str(p.save_interval), "--train.log_interval", str(p.log_interval),
        "--eval.interval", str(p.eval_interval), "--eval.max_iters", str(p.eval_iters),
        "--eval.initial_validation", "true",
        "--optimizer", json.dumps(optimizer),
        "--devices", str(p.devices), "--num_nodes", str(p.num_nodes),
        "--logger_name", "csv", "--seed", str(profile.runtime.seed),
    ]
    if val is not None:
        cmd += ["--data.val_path", str(val)]
    if p.corpus_max_tokens:
        cmd += ["--data.max_tokens", str(p.corpus_max_tokens)]
    return cmd


def format_command(cmd: Sequence[str]) -> str:
    """A command as a copy-pasteable shell line, one ``--flag value`` per line."""
    import shlex

    cmd = list(cmd)
    litgpt = cmd[1:3] == ["-m", "litgpt"]
    head, rest = (["litgpt", *cmd[3:5]], cmd[5:]) if litgpt else (cmd[:1], cmd[1:])
    parts, i = [], 0
    while i < len(rest):
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            parts.append(f"{rest[i]} {shlex.quote(rest[i + 1])}")
            i += 2
        else:
            parts.append(rest[i])
            i += 1
    return " \\\n    ".join([" ".join(head)] + parts)


def prepare_corpus(profile: Profile, train: Path, val: Path | None, tokenizer_dir: Path):
    """Tokenize and check the corpus here, so bad data fails with a ``DataError`` in the notebook."""
    from litgpt import Tokenizer

    from .lit_data import JsonlText

    data = JsonlText(train_path=train, val_path=val, cache_dir=pretrain_paths(profile).tokens,
                     max_tokens=profile.pretrain.corpus_max_tokens, seed=profile.runtime.seed)
    data.connect(Tokenizer(tokenizer_dir), profile.pretrain.micro_batch_size, lit_config(profile).block_size)
    data.prepare_data()
    return data


# ----------------------------------------------------------------------------- running
@dataclass
class PretrainResult:
    """What one call of ``run_pretraining`` did and where it left things."""

    out_dir: Path
    final_checkpoint: Path
    seconds: float
    resumed_from: str | None = None
    initial_val_loss: float | None = None
    final_val_loss: float | None = None
    skipped: bool = False
    command: list[str] = field(default_factory=list, repr=False)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    if not torch.cuda.is_available():
        env.setdefault("TORCHDYNAMO_DISABLE", "1")   # torch.compile costs 13-17 s on CPU for no gain
    return env


def _settings_key(cmd: list[str]) -> str:
    i = cmd.index("--resume")
    return json.dumps(cmd[1:i] + cmd[i + 2:])      # everything but the interpreter and --resume


def load_summary(paths: PretrainPaths) -> dict[str, Any]:
    """The last pretraining run's summary (losses, tokens), or {} before the first."""
    return json.loads(paths.summary.read_text()) if paths.summary.is_file() else {}


def run_pretraining(profile: Profile, max_tokens: int | None = None, resume: bool = True,
                    verbose: str = "progress", force: bool = False) -> PretrainResult:
    """Run ``litgpt pretrain`` for the profile, streaming its progress; resumes by default.

    A finished run with the same settings is not repeated (``force=True`` runs anyway).
    ``verbose``: ``"progress"`` (a bar and the loss lines), ``"all"`` (every line) or ``"none"``.
    Bad corpus data raises ``DataError`` before LitGPT starts; a LitGPT failure raises
    ``PretrainError`` with the tail of the log. Stopping the cell stops LitGPT; call again to
    continue from the last ``step-*`` checkpoint.
    """
    paths = pretrain_paths(profile)
    paths.root.mkdir(parents=True, exist_ok=True)
    train, val = corpus_paths(profile)
    tok_dir = ensure_tokenizer(profile)
    cmd = pretrain_command(profile, train, val, tok_dir, max_tokens, resume)
    summary = load_summary(paths)
    final = paths.lit / "final" / "lit_model.pth"
    if resume and not force and final.is_file() and summary.get("settings") == _settings_key(cmd):
        if verbose != "none":
            print(f"pretraining already done with these settings: {final.parent}")
        return PretrainResult(paths.lit, final.parent, 0.0, None, summary.get("initial_val_loss"),
                              summary.get("final_val_loss"), skipped=True, command=cmd)
    prepare_corpus(profile, train, val, tok_dir)
    if verbose != "none":
        from .plan import plan_pretraining
        config = lit_config(profile)
        n_params = config.n_layer * 12 * config.n_embd ** 2 + 2 * config.padded_vocab_size * config.n_embd
        print(plan_pretraining(profile, n_params, int(max_tokens or profile.pretrain.max_tokens)))
    if not resume:
        shutil.rmtree(paths.lit, ignore_errors=True)
        summary = {}
    drop_partial_checkpoints(paths.lit)
    max_iters = int(max_tokens or profile.pretrain.max_tokens) // (
        tokens_per_iter(profile) * profile.pretrain.devices * profile.pretrain.num_nodes)
    result = PretrainResult(paths.lit, paths.lit / "final", 0.0, command=cmd)
    try:
        run_litgpt(cmd, paths, max_iters, verbose, result)
    finally:       # keep the step-0 validation loss even if this run is interrupted
        if result.resumed_from is None and result.initial_val_loss is not None:
            summary["initial_val_loss"] = result.initial_val_loss
        summary.update(final_val_loss=result.final_val_loss, last_run_seconds=round(result.seconds, 1))
        write_json_atomic(paths.summary, summary, indent=2)
    result.initial_val_loss = summary.get("initial_val_loss", result.initial_val_loss)
    summary["settings"] = _settings_key(cmd)          # only a finished run counts as done
    write_json_atomic(paths.summary, summary, indent=2)
    return result


def drop_partial_checkpoints(out_dir: str | Path) -> list[Path]:
    """Delete ``step-*`` checkpoints cut off mid-save, so ``--resume auto`` picks a good one.

    LitGPT writes ``lit_model.pth`` first and ``model_config.yaml`` last; a folder without the
    latter was interrupted while saving.
    """
    dropped = []
    for d in sorted(Path(out_dir).glob("step-*")):
        if d.is_dir() and not (d / "model_config.yaml").is_file():
            print(f"removing incomplete checkpoint {d} (interrupted while saving)")
            shutil.rmtree(d)
            dropped.append(d)
    return dropped


def run_litgpt(cmd: list[str], paths: PretrainPaths, max_iters: int | None = None,
               verbose: str = "progress", result: PretrainResult | None = None) -> PretrainResult:
    """Run a LitGPT command, log it to ``paths.log``, show progress; ``PretrainError`` on failure.

    What the output tells (resumed checkpoint, validation losses) is filled into ``result``.
    """
    from tqdm.auto import tqdm

    paths.root.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    res = result or PretrainResult(paths.lit, paths.lit / "final", 0.0, command=cmd)
    bar = tqdm(total=max_iters, desc="pretrain iters", disable=verbose == "none", mininterval=1.0)
    t0 = time.perf_counter()
    with open(paths.log, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=_env(), cwd=str(REPO_ROOT))
        try:
            for line in proc.stdout:
                log.write(line)
                line = line.rstrip()
                tail.append(line)
                important = _parse_line(line, res, bar)
                if verbose == "all" or (verbose == "progress" and important):
                    bar.write(line)
            proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=60)
            bar.close()
            print("stopped; run again to resume from the last step-* checkpoint in", paths.lit)
            raise
    bar.close()
    res.seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise PretrainError(f"litgpt pretrain failed with exit code {proc.returncode}; "
                            f"full log: {paths.log}\n--- last lines ---\n" + "\n".join(tail))
    return res


def _parse_line(line: str, res: PretrainResult, bar) -> bool:
    """Update the result/progress from one LitGPT line; True if the line is worth showing."""
    if line.startswith("Resuming training from"):
        res.resumed_from = line.split("from", 1)[1].strip()
        return True
    if m := _ITER_RE.search(line):
        it = int(m.group(1))
        if bar.n == 0 and it > 1:
            bar.n = it - 1
        bar.update(it - bar.n)
        if res.initial_val_loss is None and m.group(4) not in ("n/a",):
            try:
                res.initial_val_loss = float(m.group(4))
            except ValueError:
                pass
        return True
    if m := _FINAL_RE.search(line):
        res.final_val_loss = float(m.group(1))
        return True
    return bool(_VAL_RE.search(line)) or line.startswith(("| -", "Total parameters", "tokenized"))


# ----------------------------------------------------------------------------- outputs
def read_metrics(out_dir: str | Path) -> list[dict[str, float]]:
    """LitGPT's CSV log (every ``logs/csv/version_*``, resumed runs included) as rows by iteration."""
    rows: dict[int, dict[str, float]] = {}
    versions = sorted(Path(out_dir, "logs", "csv").glob("version_*"),
                      key=lambda p: int(p.name.split("_")[1]))
    for v in versions:
        path = v / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                step = int(float(r["step"]))
                row = rows.setdefault(step, {"step": step})
                row.update({k: float(x) for k, x in r.items() if x not in ("", None) and k != "step"})
    return [rows[k] for k in sorted(rows)]


def loss_curves(rows: list[dict[str, float]], initial_val: float | None = None,
                final_val: float | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """``{"train": (tokens, losses), "val": (tokens, losses)}`` from ``read_metrics`` rows.

    ``initial_val``/``final_val`` (from ``PretrainResult``) add the step-0 validation, which
    LitGPT only prints, and the final one, which its CSV logger may not flush before exiting.
    """
    out: dict[str, tuple[list[float], list[float]]] = {"train": ([], []), "val": ([], [])}
    per_iter = max_tokens = 0.0
    for r in rows:
        if "loss" in r and "tokens" in r:
            per_iter = r["tokens"] / r["iter"]
            max_tokens = max(max_tokens, r["tokens"])
            out["train"][0].append(r["tokens"])
            out["train"][1].append(r["loss"])
    val = [((r["step"] + 1) * per_iter, r["val_loss"]) for r in rows if "val_loss" in r and per_iter]
    if initial_val is not None:
        val.insert(0, (0.0, initial_val))
    if final_val is not None and (not val or val[-1][0] < max_tokens):
        val.append((max_tokens, final_val))
    out["val"] = ([x for x, _ in val], [y for _, y in val])
    return out


def throughput(rows: list[dict[str, float]], profile: Profile) -> dict[str, float]:
    """Median ms per iteration (one micro-batch), ms per optimizer step and tokens/second."""
    import statistics

    times = [r["iter_time"] for r in rows if "iter_time" in r][1:] or \
        [r["iter_time"] for r in rows if "iter_time" in r]
    if not times:
        return {}
    p = profile.pretrain
    accum = max(1, p.global_batch_size // (p.micro_batch_size * p.devices * p.num_nodes))
    ms = 1000 * statistics.median(times)
    tok = tokens_per_iter(profile) * p.devices * p.num_nodes
    return {"ms_per_iter": ms, "ms_per_step": ms * accum, "tokens_per_sec": tok / (ms / 1000),
            "micro_batch_size": p.micro_batch_size, "block_size": lit_config(profile).block_size}


def scaling_estimate(n_params: int, tokens_seen: int, tokens_per_sec: float) -> dict[str, float]:
    """What more compute buys: Chinchilla's ~20 tokens per parameter, 6*N*D FLOPs, and the time."""
    optimal = 20 * n_params
    return {"params": n_params, "tokens_seen": tokens_seen, "chinchilla_tokens": optimal,
            "fraction_of_optimal": tokens_seen / optimal, "train_flops": 6 * n_params * tokens_seen,
            "optimal_flops": 6 * n_params * optimal,
            "hours_to_optimal_here": optimal / max(tokens_per_sec, 1e-9) / 3600}


# ----------------------------------------------------------------------------- sampling
def lit_model(profile: Profile, checkpoint: str | Path | None = None, seed: int = 0):
    """A LitGPT ``GPT``: random weights (``checkpoint=None``) or a checkpoint's ``lit_model.pth``."""
    import torch
    from litgpt import GPT

    torch.manual_seed(seed)
    config = lit_config(profile)
    if checkpoint is not None:
        from litgpt import Config
        config = Config.from_file(Path(checkpoint) / "model_config.yaml")
    model = GPT(config)
    if checkpoint is not None:
        state = torch.load(Path(checkpoint) / "lit_model.pth", map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
    return model.eval()


def lit_generate(model, tokenizer_dir: str | Path, prompts: Sequence[str], max_new_tokens: int = 40,
                 temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> list[str]:
    """Continue each prompt with LitGPT's ``generate`` (greedy at ``temperature=0``)."""
    import torch
    from litgpt import Tokenizer
    from litgpt.generate.base import generate

    tok = Tokenizer(tokenizer_dir)
    outs = []
    device = next(model.parameters()).device
    for i, prompt in enumerate(prompts):
        ids = tok.encode(prompt, bos=False, device=device)
        total = min(len(ids) + max_new_tokens, model.config.block_size)
        model.max_seq_length = total
        model.set_kv_cache(batch_size=1, device=device)
        torch.manual_seed(seed + i)
        y = generate(model, ids, total, temperature=temperature, top_k=top_k, eos_id=tok.eos_id,
                     include_prompt=False)
        outs.append(tok.decode(y))
        model.clear_kv_cache()
    model.max_seq_length = model.config.block_size
    return outs


def hf_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40,
                temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continue each prompt with ``transformers``' ``generate`` (greedy at ``temperature=0``)."""
    import torch

    outs = []
    for i, prompt in enumerate(prompts):
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        torch.manual_seed(seed + i)
        kw = dict(do_sample=True, temperature=temperature) if temperature else dict(do_sample=False)
        with torch.no_grad():
            y = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **kw)
        outs.append(tokenizer.decode(y[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs
