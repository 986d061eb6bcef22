"""Seeded mutation cases for tests/test_fuzz.py, run in a child process (a native crash must fail
the test, not kill pytest): `python -m tests.fuzz_cases KIND SEED COUNT START WORKDIR`.

Each case prints one JSON line: {"i": n, "outcome": "accepted" | "refused" | "traceback", "detail": …}.
"refused" means a typed edgelora (or converter) error; "traceback" anything else. Before each case
its index is written to WORKDIR/started, so the parent knows which case a signal came from."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

KINDS = ("adapter", "base", "manifest", "peft")


def mutate_bytes(data: bytes, rng: random.Random, head: int) -> bytes:
    """1-3 byte changes, mostly in the first ``head`` bytes (header, metadata, tensor table)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(min(head, len(buf))) if rng.random() < 0.8 else rng.randrange(len(buf))
        buf[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256), buf[pos] ^ (1 << rng.randrange(8))])
    return bytes(buf)


def mutate_text(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(chars))
        op = rng.random()
        junk = rng.choice(['"', "'", "[", "]", "=", "\n", "\ufeff", "0", "-1", "1e400", "nan", "\\", "{", "ü", "\x00", "#"])
        if op < 0.4:
            chars[pos] = junk
        elif op < 0.7:
            chars.insert(pos, junk)
        else:
            del chars[pos]
    return "".join(chars)


PEFT_VALUES = [None, 0, -1, 1, 2, 3, 1e300, float("nan"), float("inf"), "8", True, [], {}, {"(": 8}, {"q_proj": "x"},
               {"q_proj": 0}, ["q_proj"], "LORA", "LOHA"]


def mutate_config(config: dict, rng: random.Random) -> object:
    if rng.random() < 0.1:
        return rng.choice([[1, 2], None, "lora", 3])
    out = dict(config)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type",
                          "target_modules", "bias", "use_dora", "fan_in_fan_out"])
        out[key] = rng.choice(PEFT_VALUES)
    return out


def run(kind: str, seed: int, count: int, start: int, work: Path) -> None:
    from edgelora import Engine
    from edgelora.errors import EdgeloraError
    from edgelora.convert import ConvertError, plan_conversion, write_plan
    from edgelora.models.catalog import default_model_path
    from edgelora.roles.manifest import RoleCatalog
    from edgelora.roles.session import Roles

    typed = (EdgeloraError, ConvertError)
    src = work / "src"
    smol = default_model_path()
    engine = Engine(smol, n_ctx=256) if kind in ("adapter", "manifest") else None
    tiny = src / "tiny.gguf"
    msg = [{"role": "user", "content": "hi"}]

    for i in range(start, count):
        (work / "started").write_text(str(i))
        rng = random.Random(f"{seed}-{kind}-{i}")
        case = work / f"case{i}"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        outcome, detail = "accepted", ""
        try:
            if kind == "adapter":
                bad = case / "pirate.gguf"
                bad.write_bytes(mutate_bytes((src / "pirate.gguf").read_bytes(), rng, 4096))
                engine.attach(bad, name=f"m{i}")
                engine.chat(msg, max_tokens=2, temperature=0)
            elif kind == "base":
                bad = case / "base.gguf"
                bad.write_bytes(mutate_bytes(tiny.read_bytes(), rng, 2048))
                with Engine(bad, n_ctx=128) as eng:
                    eng.complete("Once", max_tokens=2, temperature=0)
            elif kind == "manifest":
                shutil.copy(src / "pirate.gguf", case / "pirate.gguf")
                text = mutate_text((src / "pirate.toml").read_text(), rng)
                (case / "pirate.toml").write_text(text, errors="surrogatepass")
                catalog = RoleCatalog([], manifests=[case / "pirate.toml"])
                roles = Roles(engine, catalog=catalog)
                name = catalog.names()[0]
                roles.use([name])
                roles.chat(msg, max_tokens=2, temperature=0)
            else:
                folder = case / "peft"
                shutil.copytree(src / "peft", folder)
                config = json.loads((folder / "adapter_config.json").read_text())
                (folder / "adapter_config.json").write_text(json.dumps(mutate_config(config, rng)))
                plan = plan_conversion(folder, tiny)
                write_plan(plan, case / "out.gguf")
        except typed as exc:
            outcome, detail = "refused", f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            outcome, detail = "traceback", f"{type(exc).__name__}: {exc}"[:200]
        finally:
            if engine is not None:
                engine.detach_all()
                for name in list(engine.resident):
                    engine.free(name)
            shutil.rmtree(case, ignore_errors=True)
        print(json.dumps({"i": i, "outcome": outcome, "detail": detail}), flush=True)
    if engine is not None:  # after every refusal the engine still answers
        out = engine.chat(msg, max_tokens=4, temperature=0)
        print(json.dumps({"i": -1, "outcome": "engine", "detail": out.text}), flush=True)


if __name__ == "__main__":
    kind, seed, count, start, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    run(kind, seed, count, start, work)
