"""`edgelora roles train NAME --data FILE`: examples -> LoRA -> GGUF adapter -> checked role, installed.

The data is checked first (standard library), then the lengths with the engine's tokenizer, and only
then are torch, transformers and peft imported. Everything is built in a hidden folder inside the
roles folder and renamed into place at the end, manifest last: the role appears whole or not at all.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import EdgeloraError
from edgelora.roles.manifest import BASE_ROLE, NAME_RE, Role, RoleAdapter, RoleError, load_manifest
from edgelora.train import ALPHA, RANK, TARGETS
from edgelora.train.data import Examples, Pair, encode, load_examples, shared_system, split

INSTALL_HINT = 'pip install "edgelora[train]"'
# SmolLM2-135M on 2 idle cores: the bundled recipe's 120 steps of 8 pairs (~70 tokens each) took
# 3.5-5 minutes, ~0.004 s per token of a batch (forward and backward). The dry run scales it to
# this machine's cores; a busy machine is slower (README "Make a role").
SECONDS_PER_TOKEN_2_CORES = 0.004
ROUTING_EXAMPLES = 8
MAX_EPOCHS = 1000.0
MAX_LR = 1.0


class TrainError(EdgeloraError):
    """Training cannot start or did not produce a usable role."""


def _interrupted(message: str) -> KeyboardInterrupt:
    """Ctrl+C stopped training: say what happened; the CLI then exits 130 as for any Ctrl+C."""
    say(message)
    return KeyboardInterrupt()


@dataclass
class TrainOptions:
    name: str
    data: Path
    n_eval: int = 4
    rank: int = RANK
    alpha: int = ALPHA
    targets: tuple[str, ...] = TARGETS
    epochs: float = 5.0
    lr: float = 2e-3
    batch: int = 8
    max_length: int = 512
    seed: int = 0
    description: str | None = None
    force: bool = False
    dry_run: bool = False
    threads: int | None = None


@dataclass
class Plan:
    examples: Examples
    train: list[Pair]
    held: list[Pair]
    encoded: list[tuple[list[int], list[int]]]
    check_tokens: int  # the longest held-out answer and a little more: the check stays short
    steps: int
    estimate_s: float
    replaces: Path | None = None  # the manifest of the role --force replaces
    system: str | None = None  # the system prompt the role sends: the one all pairs were trained with


@dataclass
class Result:
    manifest: Path
    steps: int
    losses: list[float]
    train_s: float
    total_s: float
    checks: list[dict] = field(default_factory=list)  # prompt, expected, base, role


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def missing_packages() -> list[str]:
    return [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]


def check_name(name: str, catalog, roles_dir: Path, force: bool) -> Path | None:
    """The manifest a --force run replaces, or None; refuses names that are not free, and files in
    the roles folder that are not that role's (a user's own NAME.toml, a stray NAME folder)."""
    from edgelora.roles.store import MAX_NAME_BYTES, place_taken

    if not NAME_RE.match(name) or name in (BASE_ROLE, "auto"):
        raise TrainError(f"role name {name!r} is not allowed (letters, digits, '_.-'; not 'base' or 'auto')")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise TrainError(f"role name is {len(name.encode())} bytes long; a role name may have at most {MAX_NAME_BYTES}")
    paths = catalog.found.get(name, [])
    replaces = None
    if paths:
        mine = [p for p in paths if p.parent == roles_dir.resolve()]
        if not force or len(mine) != len(paths):
            where = ", ".join(map(str, paths))
            hint = "; --force replaces it" if len(mine) == len(paths) else "; only roles in your roles folder can be replaced"
            raise TrainError(f"role '{name}' already exists ({where}){hint}")
        replaces = mine[0]
    taken = place_taken(name, roles_dir, replaces)
    if taken:
        raise TrainError(f"{taken}; move it away to add role '{name}'")
    return replaces


def check_options(opts: TrainOptions) -> None:
    """What click's ranges let through: nan and inf, and learning rates that only make NaN weights."""
    for flag, value, most in (("--epochs", opts.epochs, MAX_EPOCHS), ("--lr", opts.lr, MAX_LR)):
        if not math.isfinite(value) or not 0 < value <= most:
            raise TrainError(f"{flag} {value}: must be a number above 0 and at most {most:g}")
    bad = [t for t in opts.targets if not re.fullmatch(r"[A-Za-z0-9_.]+", t)]
    if not opts.targets or bad:
        raise TrainError(f"--targets {','.join(opts.targets)!r}: module names, comma-separated (e.g. q_proj,v_proj)")


def plan(opts: TrainOptions, engine, catalog, roles_dir: Path) -> Plan:
    """Everything that can be checked without torch: data, name, lengths, steps, time estimate."""
    examples = load_examples(opts.data)
    train, held = split(examples, opts.n_eval, opts.seed)
    replaces = check_name(opts.name, catalog, roles_dir, opts.force)
    check_options(opts)
    n_ctx = engine.llama.n_ctx()
    limit = min(opts.max_length, n_ctx)
    encoded = []
    for pair in train + held:
        p, t = encode(engine, pair.messages(), pair.answer)
        if len(p) + len(t) > limit:
            why = f"--max-length {opts.max_length}" if limit == opts.max_length else f"the context ({n_ctx})"
            raise TrainError(f"{pair.where}: prompt and answer are {len(p) + len(t)} tokens, over {why}; shorten it "
                             "or raise --max-length")
        encoded.append((p, t))
    check_tokens = max([len(t) for _, t in encoded[len(train):]], default=0) + 16
    encoded = encoded[: len(train)]
    steps = max(1, math.ceil(opts.epochs * len(train) / opts.batch))
    mean_tokens = sum(len(p) + len(t) for p, t in encoded) / len(encoded)
    cores = opts.threads or os.cpu_count() or 2
    estimate = steps * opts.batch * mean_tokens * SECONDS_PER_TOKEN_2_CORES * 2 / min(cores, 8)
    system, differ = shared_system(examples.pairs)
    if differ:
        say(f"note: the pairs of {examples.path.name} have different system prompts; role '{opts.name}' will send "
            "none of its own")
    return Plan(examples, train, held, encoded, check_tokens, steps, estimate, replaces, system)


def describe(opts: TrainOptions, p: Plan, base: Path) -> str:
    tokens = sum(len(a) + len(b) for a, b in p.encoded)
    return (f"role '{opts.name}': {len(p.train)} training pairs ({tokens} tokens), {len(p.held)} held out; "
            f"LoRA rank {opts.rank} alpha {opts.alpha} on {','.join(opts.targets)}; {p.steps} steps of {opts.batch} "
            f"({opts.epochs:g} epochs), lr {opts.lr:g}, seed {opts.seed}; base {base.name}; "
            f"training about {_minutes(p.estimate_s)} here")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class StopOnCtrlC:
    """The first Ctrl+C asks training to stop after the current step; the second quits at once."""

    def __init__(self):
        self.stopped = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stopped = True
        say("\nstopping after this step; nothing will be installed (Ctrl+C again to quit now)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


def train_role(opts: TrainOptions, engine, catalog, roles_dir: Path) -> Result | Plan:
    """Train, convert, check and install a role; with ``opts.dry_run`` only the plan is returned."""
    p = plan(opts, engine, catalog, roles_dir)
    say(describe(opts, p, engine.model_path))
    missing = missing_packages()
    if missing:
        raise TrainError(f"training needs {', '.join(missing)}: {INSTALL_HINT}")
    if opts.dry_run:
        return p
    t0 = time.perf_counter()
    try:
        work = _work_folder(opts.name, roles_dir)
        try:
            with StopOnCtrlC() as ctrl_c:
                not_installed = f"stopped by Ctrl+C; role '{opts.name}' was not installed"
                before = []
                for pair in p.held:
                    if ctrl_c.stopped:
                        raise _interrupted(not_installed)
                    before.append(_answer(engine, pair, p.check_tokens))
                gguf, losses, train_s = _train_and_convert(opts, p, engine.model_path, work, ctrl_c)
                if ctrl_c.stopped:
                    raise _interrupted(not_installed)
                checks = _check(engine, gguf, opts.name, p.held, before, p.check_tokens, lambda: ctrl_c.stopped)
                _write_manifest(opts, p, engine, gguf, work)
                if ctrl_c.stopped:
                    raise _interrupted(not_installed)
                installed = _install(opts.name, work, roles_dir, p.replaces)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except OSError as exc:  # a read-only or full roles folder, a name too long for the file system
        raise TrainError(f"cannot write role '{opts.name}' in {roles_dir}: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename else "")) from None
    return Result(installed, p.steps, losses, train_s, time.perf_counter() - t0, checks)


def _work_folder(name: str, roles_dir: Path) -> Path:
    """A hidden '.NAME.PID.RANDOM.tmp' folder in the roles folder (the catalog skips it); those of
    earlier runs killed outright (their process is gone) are removed first."""
    from edgelora.convert.outputs import stale_temps

    roles_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_temps(roles_dir / name):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=roles_dir))


def _answer(engine, pair: Pair, max_tokens: int) -> str:
    return engine.chat(pair.messages(), max_tokens=max_tokens, temperature=0.0, seed=0).text.strip()


def _train_and_convert(opts: TrainOptions, p: Plan, base: Path, work: Path, ctrl_c: StopOnCtrlC):
    import torch
    from tqdm import tqdm

    from edgelora.convert import convert_peft
    from edgelora.train.loop import add_lora, load_base, save_peft, train

    torch.set_num_threads(opts.threads or os.cpu_count() or 2)
    torch.manual_seed(opts.seed)
    say(f"loading {base.name} de-quantized for training…")
    try:
        model = add_lora(load_base(base), rank=opts.rank, alpha=opts.alpha, targets=opts.targets, seed=opts.seed)
    except ValueError as exc:  # peft: a target module the model does not have
        raise TrainError(f"--targets {','.join(opts.targets)}: {str(exc).splitlines()[0]}") from None
    t0 = time.perf_counter()
    with tqdm(total=p.steps, desc=f"training {opts.name}", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        def on_step(step, loss):
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)

        losses = train(model, p.encoded, p.steps, opts.batch, opts.lr, opts.seed, on_step=on_step,
                       stop=lambda: ctrl_c.stopped)
    train_s = time.perf_counter() - t0
    if ctrl_c.stopped:
        raise _interrupted(f"stopped by Ctrl+C after {len(losses)} of {p.steps} steps; role '{opts.name}' was not installed")
    save_peft(model, work / "peft")
    (work / opts.name).mkdir()
    gguf = work / opts.name / f"{opts.name}.gguf"
    convert_peft(work / "peft", base, gguf, outtype="f16", name=opts.name)
    return gguf, losses, train_s


def _check(engine, gguf: Path, name: str, held: list[Pair], before: list[str], max_tokens: int,
           stopped=lambda: False) -> list[dict]:
    """The adapter in the real engine, answering the held-out prompts; detached again afterwards."""
    if not held:
        return []
    label = engine.attach(gguf, name=f"{name}.candidate")
    try:
        after = []
        for pair in held:
            if stopped():
                raise _interrupted(f"stopped by Ctrl+C; role '{name}' was not installed")
            after.append(_answer(engine, pair, max_tokens))
    finally:
        engine.detach(label, free=True)
    checks = [dict(prompt=h.prompt, expected=h.answer, base=b, role=a) for h, b, a in zip(held, before, after)]
    for c in checks:
        say(f"held out: {_short(c['prompt'])}\n  expected: {_short(c['expected'])}\n  base:     {_short(c['base'])}\n"
            f"  role:     {_short(c['role'])}")
    base_score = sum(overlap(c["base"], c["expected"]) for c in checks) / len(checks)
    role_score = sum(overlap(c["role"], c["expected"]) for c in checks) / len(checks)
    say(f"word overlap with the expected answers: base {base_score:.2f}, role {role_score:.2f}")
    if all(not c["role"] for c in checks):
        raise TrainError(f"role '{name}' answered nothing to {len(checks)} held-out prompts; not installed "
                         "(try fewer epochs or a lower --lr)")
    return checks


def overlap(answer: str, expected: str) -> float:
    """F1 of the words of two texts: a rough 'closer to the examples' figure for the check."""
    a, e = re.findall(r"\w+", answer.lower()), re.findall(r"\w+", expected.lower())
    common = sum(min(a.count(w), e.count(w)) for w in set(a))
    return 0.0 if not common else 2 * common / (len(a) + len(e))


def _short(text: str, width: int = 110) -> str:
    """One line; a long text keeps its start and its end (where a sign-off or a closing brace is)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width * 2 // 3] + " … " + text[-(width // 3):]


def _write_manifest(opts: TrainOptions, p: Plan, engine, gguf: Path, work: Path) -> Path:
    from edgelora.files import sha256_file
    from edgelora.roles.store import manifest_text

    prompts = list(dict.fromkeys(pair.prompt for pair in p.train))
    step = max(1, len(prompts) // ROUTING_EXAMPLES)  # spread over the file, not its first lines
    role = Role(
        name=opts.name,
        path=None,
        description=opts.description or f"trained from {p.examples.path.name} ({len(p.train)} examples)",
        system=p.system,
        adapters=[RoleAdapter(gguf, sha256_file(gguf), 1.0)],
        base_architecture=engine.architecture,
        base_sha256=sha256_file(engine.model_path),
        sampling={"temperature": 0.0},
        examples=prompts[::step][:ROUTING_EXAMPLES],
    )
    manifest = work / f"{opts.name}.toml"
    manifest.write_text(manifest_text(role, {gguf: f"{opts.name}/{gguf.name}"}), "utf-8")
    written = load_manifest(manifest)
    if written.adapters[0].sha256 != role.adapters[0].sha256:
        raise RoleError(f"{manifest}: the written manifest does not pin the trained adapter")
    return manifest


def _install(name: str, work: Path, roles_dir: Path, replaces: Path | None) -> Path:
    """Every check first, then the old role removed, then the adapter folder and the manifest renamed
    in (manifest last): the catalog sees the role only when whole. Ctrl+C waits until it is done."""
    from edgelora.roles.store import place_taken, remove_role

    old = load_manifest(replaces) if replaces is not None else None
    taken = place_taken(name, roles_dir, replaces)  # again: files may have appeared while training
    if taken:
        raise TrainError(f"{taken}; move it away to add role '{name}'")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if old is not None:
            remove_role(old)
        folder, manifest = roles_dir / name, roles_dir / f"{name}.toml"
        os.rename(work / name, folder)
        os.replace(work / f"{name}.toml", manifest)
    finally:
        signal.signal(signal.SIGINT, previous)
    return manifest
