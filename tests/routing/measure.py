"""Figures for the README's routing section: `python tests/routing/measure.py [--json]`.

Accuracy, neutral->style false routes and a confusion table on the held-out set (eval.toml) for
the meaning router and the old TF-IDF router (same prompts, same manifests); the time to route
one prompt (each eval prompt once, after the model is loaded); the model's load time, resident
memory and package size.

User roles (`--user-roles FILE`, default the held-out heldout_user_roles.toml): a file of
`[[roles]]` (description, keywords, examples, as a user writes them) and labelled `[[cases]]`
(kinds asks/mentions/cross/neutral/bundled), routed with the bundled roles beside them: accuracy
per kind, and "neutral->style" = the mentions and neutral cases routed to any role.

`--dev`: the development sets only, with their misses, for tuning without a look at the held-out ones."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
LABELS = ["pirate", "json", "terse", "signoff", "base"]


def labelled(name: str) -> list[tuple[str, str]]:
    from edgelora._toml import tomllib

    data = tomllib.loads((HERE / name).read_text())
    return [(p, role) for role, prompts in data.items() for p in prompts]


def evaluate(roles, method: str, data) -> dict:
    from edgelora.routing import router

    got = [(want, router.route(p, roles, method=method).role) for p, want in data]
    neutral = [g for w, g in got if w == "base"]
    table = Counter(got)
    return {"accuracy": sum(w == g for w, g in got) / len(got),
            "neutral_to_style": sum(g != "base" for g in neutral) / len(neutral),
            "confusion": {w: {g: table[(w, g)] for g in LABELS} for w in LABELS}}


def user_roles(name: str):
    """(bundled + the file's roles, [(prompt, expect, kind)]) of a user-roles set."""
    from edgelora._toml import tomllib
    from edgelora.roles.manifest import Role, RoleCatalog, bundled_dir

    data = tomllib.loads((HERE / name).read_text())
    own = [Role(r["name"], HERE / name, description=r.get("description", ""), keywords=r.get("keywords", []),
                examples=r.get("examples", [])) for r in data["roles"]]
    cases = [(c["prompt"], c["expect"], c["kind"]) for c in data["cases"]]
    return RoleCatalog([bundled_dir()]).roles() + own, cases


def evaluate_user_roles(name: str, method: str = "meaning") -> dict:
    from edgelora.routing import router

    roles, cases = user_roles(name)
    got = [(p, want, kind, router.route(p, roles, method=method)) for p, want, kind in cases]
    plain = [r.role for _, want, kind, r in got if kind in ("mentions", "neutral")]
    kinds = sorted({k for _, _, k in cases})
    return {"cases": len(cases), "accuracy": sum(w == r.role for _, w, _, r in got) / len(got),
            "neutral_to_style": sum(g != "base" for g in plain) / len(plain),
            "by_kind": {k: round(sum(w == r.role for _, w, kk, r in got if kk == k)
                                 / sum(kk == k for _, _, kk, _ in got), 3) for k in kinds},
            "misses": [f"[{k}] {p!r}: want {w}, got {r.role} ({r.reason})" for p, w, k, r in got if w != r.role]}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _package_mb() -> float:
    from edgelora.routing.embedder import model_dir

    return sum(f.stat().st_size for f in model_dir().parent.rglob("*") if f.is_file()) / 1e6


def main() -> dict:
    from edgelora.routing import embedder
    from edgelora.routing import router
    from edgelora.roles.manifest import RoleCatalog, bundled_dir

    roles = RoleCatalog([bundled_dir()]).roles()
    data = labelled("eval.toml")
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    embedder.embedder()
    router.route("warm up: load the model and embed the roles", roles)
    load_s = time.perf_counter() - t0
    rss1 = _rss_mb()
    times, by_meaning = [], []
    for prompt, _ in data:
        t = time.perf_counter()
        router.route(prompt, roles)
        times.append((time.perf_counter() - t) * 1e3)
        if router._rules(prompt, roles) is None:  # reached the embedding model
            by_meaning.append(times[-1])
    times.sort()
    by_meaning.sort()
    return {"eval_prompts": len(data), "neutral_prompts": sum(w == "base" for _, w in data),
            "meaning": evaluate(roles, "meaning", data), "tfidf": evaluate(roles, "tfidf", data),
            "threshold": router.SEMANTIC_THRESHOLD,
            "route_ms": {"median": round(statistics.median(times), 1), "p95": round(times[int(0.95 * len(times))], 1),
                         "max": round(times[-1], 1)},
            "route_ms_by_meaning": {"n": len(by_meaning), "median": round(statistics.median(by_meaning), 1),
                                    "p95": round(by_meaning[int(0.95 * len(by_meaning))], 1)},
            "first_use_s": round(load_s, 2), "rss_added_mb": round(rss1 - rss0), "weights_mb": round(embedder.embedder().nbytes / 1e6),
            "package_mb": round(_package_mb()), "load_average": os.getloadavg()[0],
            "user_roles": {k: v for k, v in evaluate_user_roles(_user_roles_file()).items() if k != "misses"}}


def _user_roles_file() -> str:
    args = sys.argv[1:]
    return args[args.index("--user-roles") + 1] if "--user-roles" in args else "heldout_user_roles.toml"


DEV_SETS = ("dev.toml", "dev_bundled2.toml", "dev_bundled3.toml", "dev_bundled4.toml")
DEV_USER_SETS = ("dev_user_roles.toml", "dev_user_roles2.toml", "dev_user_roles3.toml", "dev_user_roles4.toml",
                 "dev_user_roles5.toml", "dev_user_roles6.toml")


def development() -> None:
    """`--dev`: the development sets only, with their misses (never eval.toml or the held-out user roles)."""
    from edgelora.routing import router
    from edgelora.roles.manifest import RoleCatalog, bundled_dir

    roles = RoleCatalog([bundled_dir()]).roles()
    for name in DEV_SETS:
        data = labelled(name)
        m = evaluate(roles, "meaning", data)
        print(f"{name}: accuracy {m['accuracy']:.1%}, neutral->style {m['neutral_to_style']:.1%}")
        for prompt, want in data:
            got = router.route(prompt, roles)
            if got.role != want:
                print(f"  want {want}, got {got.role}: {prompt!r} ({got.reason})")
    for name in DEV_USER_SETS:
        u = evaluate_user_roles(name)
        print(f"{name}: accuracy {u['accuracy']:.1%}, neutral->style {u['neutral_to_style']:.1%}, by kind {u['by_kind']}")
        for miss in u["misses"]:
            print("  " + miss)


if __name__ == "__main__" and "--dev" in sys.argv:
    sys.path.insert(0, str(HERE.parent.parent))
    development()
elif __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    r = main()
    if "--json" in sys.argv:
        print(json.dumps(r, indent=1))
    else:
        for name in ("meaning", "tfidf"):
            m = r[name]
            print(f"{name}: accuracy {m['accuracy']:.1%}, neutral->style {m['neutral_to_style']:.1%}")
            print("  want\\got " + " ".join(f"{g:>7}" for g in LABELS))
            for w in LABELS:
                print(f"  {w:<8} " + " ".join(f"{m['confusion'][w][g]:>7}" for g in LABELS))
        u = r["user_roles"]
        print(f"user roles ({_user_roles_file()}, {u['cases']} cases): accuracy {u['accuracy']:.1%}, "
              f"neutral->style {u['neutral_to_style']:.1%}, by kind {u['by_kind']}")
        print({k: v for k, v in r.items() if k not in ("meaning", "tfidf", "user_roles")})
