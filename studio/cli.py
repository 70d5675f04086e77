"""`peft-studio` — the command line.

  serve     the studio (UI at /, REST at /api); with no broker configured it also
            starts and supervises an embedded worker
  worker    a Celery worker for the configured broker
  train     run the engine directly on a config file, no queue
  submit    queue a config file on the studio's database/broker
  evaluate  queue an lm-evaluation-harness benchmark of a finished run (or a base model)
  estimate  memory estimate for a model/method/batch/sequence
  db        database migrations (upgrade / downgrade / current)
  keys      API keys for /v1 (create NAME / list / revoke ID), per user
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _die(msg: str, code: int = 2) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def cmd_train(args) -> int:
    from engine import phases
    from engine.adapters import save_adapter
    from engine.config import ConfigError, load_run_config
    from engine.data import DataError
    from engine.models import ModelLoadError
    from engine.methods.targeting import TargetModulesError
    from engine.prepare import prepare_run
    from engine.train import train

    try:
        cfg = load_run_config(args.config)
        out = Path(args.out or f"runs/{cfg.name}")
        if cfg.training.distributed.world_size > 1:
            return train_distributed(cfg, out)
        print(f"[{cfg.name}] reading {cfg.dataset.label()} ...", file=sys.stderr)
        # loading / converting the model: a line each (engine.phases); training and evaluating: on the bar
        prep = prepare_run(cfg, progress=True,
                           on_phase=lambda text: print(f"[{cfg.name}] {text} ...", file=sys.stderr))
    except (ConfigError, DataError, ModelLoadError, TargetModulesError, ValueError) as e:
        _die(str(e))
    print(f"[{cfg.name}] {cfg.method.name}: {prep.n_trainable:,} trainable of {prep.n_params:,} parameters "
          f"({100 * prep.trainable_ratio:.4f}%)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    tmp_metrics = out / ".metrics.jsonl.tmp"
    with open(tmp_metrics, "w") as mf:
        def on_step(m):
            mf.write(json.dumps(m.to_dict()) + "\n")
            mf.flush()
        result = train(prep, on_step=on_step, progress=True)
    os.replace(tmp_metrics, metrics_path)
    print(f"[{cfg.name}] {phases.SAVING} ...", file=sys.stderr)
    save_adapter(prep, out, extra_files={"results.json": json.dumps(result.to_dict(), indent=2).encode()})
    ev = ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items() if isinstance(v, (int, float)))
    print(f"[{cfg.name}] done: {result.steps} steps in {result.duration_s:.1f} s, loss {result.final_loss:.4f}"
          f"{', ' + ev if ev else ''}; adapter in {out}", file=sys.stderr)
    return 0


def train_distributed(cfg, out: Path) -> int:
    """`train` with training.distributed.world_size > 1: N local ranks under torch's
    elastic agent; rank 0 draws the progress bar and writes the usual files into `out`."""
    from engine.distributed import DistributedError
    from engine.launch import launch_local

    d = cfg.training.distributed
    print(f"[{cfg.name}] starting {d.world_size} ranks ({d.strategy}) for {cfg.model} on "
          f"{cfg.dataset.label()} ...", file=sys.stderr)
    try:
        result = launch_local(cfg, out, d.world_size, progress=True)
    except DistributedError as e:
        _die(str(e), code=1)
    ev = ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items() if isinstance(v, (int, float)))
    print(f"[{cfg.name}] done: {result.steps} steps on {d.world_size} ranks in {result.duration_s:.1f} s, "
          f"loss {result.final_loss:.4f}{', ' + ev if ev else ''}; adapter in {out}", file=sys.stderr)
    return 0


def estimate_kwargs(a) -> dict:
    from engine.methods.targeting import parse_target_list

    method = {"name": a.method}
    if a.r is not None:
        method["r"] = a.r
    if a.target_modules:
        method["target_modules"] = parse_target_list(a.target_modules)
    return dict(model=a.model, method=method, batch_size=a.batch, seq_len=a.seq, dtype=a.dtype, quant=a.quant,
                formula=a.formula, optimizer=a.optimizer, grad_checkpointing=a.grad_checkpointing,
                world_size=a.world_size, strategy=a.strategy, **({"task": a.task} if a.task else {}))


def cmd_estimate(args) -> int:
    from engine.estimator import estimate

    try:
        est = estimate(**estimate_kwargs(args))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        _die(str(e))
    if args.json:
        print(json.dumps(est.to_json()))
        return 0
    gib = 1024 ** 3
    d = est.to_json()
    per = f" · per device of {args.world_size} ({args.strategy})" if args.world_size > 1 else ""
    print(f"{args.model} · {args.method} · batch {args.batch} × seq {args.seq} · {args.dtype} · "
          f"quant {args.quant} · {args.optimizer} · formula {args.formula}{per}")
    print(f"parameters: {d['n_params']:,} total, {d['n_trainable']:,} trainable "
          f"({100 * d['n_trainable'] / max(1, d['n_params']):.4f}%)")
    for k, v in d["rows"].items():
        print(f"  {k:<14} {v / gib:10.3f} GiB  ({v:,} bytes)")
    return 0


def cmd_db(args) -> int:
    from workers import db
    from workers.settings import load_settings, redact_url

    s = load_settings()
    if s.database_url.startswith("sqlite"):
        s.ensure_dirs()
    if args.action == "upgrade":
        db.upgrade(s.database_url, args.revision or "head")
    elif args.action == "downgrade":
        db.downgrade(s.database_url, args.revision or "-1")
    else:
        from alembic import command
        command.current(db.alembic_config(s.database_url))
        return 0
    print(f"database {redact_url(s.database_url)}: {args.action} {args.revision or ''} done".rstrip())
    return 0


def cmd_worker(args) -> int:
    from studio.runtime import run_worker

    return run_worker(name=args.name, loglevel=args.loglevel)


def cmd_serve(args) -> int:
    from studio.server import serve

    return serve(host=args.host, port=args.port, allow_public=args.allow_public_without_login,
                 embedded_worker=not args.no_worker)


def cmd_submit(args) -> int:
    from engine.config import ConfigError, load_run_config
    from studio.service import SubmitError, submit_run
    from workers.settings import load_settings

    try:
        cfg = load_run_config(args.config)
        run_id = submit_run(load_settings(), cfg.to_dict(), owner=os.environ.get("USER"))
    except (ConfigError, SubmitError) as e:
        _die(str(e))
    print(json.dumps({"id": run_id}))
    return 0


def cmd_evaluate(args) -> int:
    """Queue a benchmark job; with --wait, poll the database until it ends and print it."""
    import time

    from studio import benchmarks as bm
    from studio.service import NotFound, get_run
    from workers.settings import load_settings

    settings = load_settings()
    body = {"tasks": [t for t in (args.tasks or "").split(",") if t.strip()], "limit": args.limit,
            "num_fewshot": args.num_fewshot}
    if args.user_task:
        body["user_tasks"] = [Path(f).read_text() for f in args.user_task]
    try:
        if args.run_id == "base":
            if not args.model:
                _die("model: give --model with RUN_ID 'base'")
            job = bm.submit_for_base(settings, {**body, "model": args.model}, owner=os.environ.get("USER"))
        else:
            try:
                run = get_run(settings, int(args.run_id))
            except ValueError:
                _die(f"run_id: a run id or 'base', not {args.run_id!r}")
            job = bm.submit_for_run(settings, run, body, owner=os.environ.get("USER"))
    except (bm.BenchmarkRequestError, NotFound, OSError) as e:
        _die(str(e))
    while args.wait and job["status"] in ("queued", "running"):
        time.sleep(1.0)
        job = bm.get_job(settings, job["id"])
    print(json.dumps(job, indent=2 if args.wait else None))
    return 1 if job["status"] in ("failed", "cancelled") else 0



def cmd_study(args) -> int:
    """Submit a study (YAML or JSON file), then follow it, advancing it as the studio's
    driver does (either may advance it; they take turns), until it finishes."""
    import time

    import yaml

    from studio import studies
    from studio.study_driver import advance
    from studio.study_space import StudyError
    from studio.study_storage import StudyStorageError
    from workers.settings import load_settings

    settings = load_settings()
    try:
        text = Path(args.config).read_text(encoding="utf-8")
        body = json.loads(text) if args.config.endswith(".json") else yaml.safe_load(text)
        sid = studies.create_study(settings, body, owner=os.environ.get("USER"))
    except FileNotFoundError:
        _die(f"config file not found: {args.config}")
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        _die(f"config file {args.config} is not valid YAML/JSON: {e}")
    except (StudyError, StudyStorageError) as e:
        _die(str(e))
    print(json.dumps({"id": sid}), flush=True)
    if args.no_wait:
        return 0
    seen: dict = {}
    while True:
        try:
            advance(settings, sid)
        except Exception as e:   # the studio's driver may hold it, or a passing database error
            print(f"study {sid}: {e}", file=sys.stderr)
        st = studies.get_study(settings, sid)
        for t in st["trials"]:
            key = (t["method"], t["number"])
            shown = (t["state"], t["value"])
            if seen.get(key) != shown:
                seen[key] = shown
                val = f" {st['metric']}={t['value']:.4f}" if t["value"] is not None else ""
                lr = t["params"].get("learning_rate")
                print(f"study {sid} · {t['method']} trial {t['number']} · lr {lr:.2e} · {t['state']}{val}"
                      + (f" · run {t['run_id']}" if t["run_id"] else "")
                      + (f" · {t['reason']}" if t["reason"] and t["state"] != "completed" else ""), flush=True)
        if st["status"] != "running":
            break
        time.sleep(args.interval)
    print(json.dumps({"id": sid, "status": st["status"], "best": st["best"]}))
    return 0 if st["status"] == "completed" else 1

def cmd_keys(args) -> int:
    """API keys of a user (workers.api_keys). With login on, --user must name one of its
    users; an admin's view of everyone's keys is --all."""
    from studio.auth import Auth
    from studio.runtime import prepare_database
    from workers import api_keys
    from workers.settings import load_settings

    s = load_settings()
    prepare_database(s)
    auth = Auth.from_env()
    user = args.user
    if auth.enabled and not args.all and user not in auth.users:
        _die("--user: login is on; name one of the studio's users (STUDIO_USERS / STUDIO_USERS_FILE)"
             if user is None else f"--user: {user!r} is not a user of this studio")
    url = s.database_url
    if args.action == "create":
        if not args.name:
            _die("NAME: give the key a name, e.g. `peft-studio keys create laptop --user alice`")
        try:
            row, key = api_keys.create_key(url, user, args.name)
        except api_keys.ApiKeyError as e:
            _die(str(e))
        print(json.dumps({**row, "key": key}) if args.json else
              f"key {row['id']} ({row['name']}) for {user or 'this studio'}; shown only now:\n{key}")
        if not auth.enabled:
            print("note: login is off, so /v1 is open and needs no key", file=sys.stderr)
        return 0
    if args.action == "list":
        rows = api_keys.list_keys(url, user, everyone=args.all)
        if args.json:
            print(json.dumps(rows))
        for r in [] if args.json else rows:
            state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
            print(f"{r['id']:>5}  {r['prefix']}…  {r['name']:<30} {r['owner'] or '-':<20} {r['created_at']}  {state}")
        return 0
    try:
        key_id = int(args.name or "")
    except ValueError:
        _die("ID: the number of the key to revoke (see `peft-studio keys list`)")
    if not api_keys.revoke_key(url, user, key_id, everyone=args.all):
        _die(f"ID: no key {key_id} of {user or 'this studio'}")
    print(f"key {key_id} revoked")
    return 0


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-studio", description="PEFT Studio: try PEFT methods side by side.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="serve the studio (UI at /, REST at /api)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    s.add_argument("--allow-public-without-login", action="store_true",
                   help="serve on a non-loopback address with no login (not recommended)")
    s.set_defaults(fn=cmd_serve)

    w = sub.add_parser("worker", help="a Celery worker for the configured broker")
    w.add_argument("--name", default=None, help="worker name (default worker-<pid>@<host>)")
    w.add_argument("--loglevel", default="INFO")
    w.set_defaults(fn=cmd_worker)

    t = sub.add_parser("train", help="train directly from a config file (no queue)")
    t.add_argument("config")
    t.add_argument("--out", default=None, help="output directory (default runs/<name>)")
    t.set_defaults(fn=cmd_train)

    sb = sub.add_parser("submit", help="queue a config file on the configured database/broker")
    sb.add_argument("config")
    sb.set_defaults(fn=cmd_submit)

    ev = sub.add_parser("evaluate", help="queue an lm-evaluation-harness benchmark of a finished run")
    ev.add_argument("run_id", help="a finished causal-LM run's id, or 'base' with --model")
    ev.add_argument("--tasks", default="", help="comma-separated harness task names")
    ev.add_argument("--user-task", action="append", default=None, metavar="YAML",
                    help="a harness task YAML over an uploaded file (repeatable)")
    ev.add_argument("--limit", type=float, default=None, help="documents per task (a fraction below 1: that share)")
    ev.add_argument("--num-fewshot", type=int, default=None)
    ev.add_argument("--model", default=None, help="the base model, with RUN_ID 'base'")
    ev.add_argument("--wait", action="store_true", help="wait for the job and print its results")
    ev.set_defaults(fn=cmd_evaluate)

    st = sub.add_parser("study", help="a study: tune each method's learning rate within one budget (docs/studies.md)")
    st.add_argument("config", help="YAML or JSON: name, base (a run config without method), methods, budget, metric")
    st.add_argument("--no-wait", action="store_true", help="print the study id and return; the studio drives it")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between progress checks")
    st.set_defaults(fn=cmd_study)

    e = sub.add_parser("estimate", help="GPU memory estimate")
    e.add_argument("--model", required=True)
    e.add_argument("--method", required=True)
    e.add_argument("--r", type=int, default=None)
    e.add_argument("--target-modules", default=None)
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--seq", type=int, default=512)
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    e.add_argument("--quant", choices=["none", "nf4", "nf4-dq"], default="none")
    e.add_argument("--formula", choices=["slide", "appendix", "model"], default="model")
    e.add_argument("--optimizer", choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"], default="adamw")
    e.add_argument("--world-size", type=_positive_int, default=1, help="devices; rows become per device")
    e.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="ddp: a replica per device; fsdp: weights, gradients and optimizer states sharded")
    e.add_argument("--grad-checkpointing", action="store_true")
    e.add_argument("--task", choices=["classification", "causal_lm"], default=None)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_estimate)

    d = sub.add_parser("db", help="database migrations")
    d.add_argument("action", choices=["upgrade", "downgrade", "current"])
    d.add_argument("revision", nargs="?", default=None)
    d.set_defaults(fn=cmd_db)

    k = sub.add_parser("keys", help="API keys for the OpenAI-compatible /v1 (create NAME, list, revoke ID)")
    k.add_argument("action", choices=["create", "list", "revoke"])
    k.add_argument("name", nargs="?", default=None, help="create: the key's name; revoke: its ID")
    k.add_argument("--user", default=None, help="whose keys (with login on: one of the studio's users)")
    k.add_argument("--all", action="store_true", help="list / revoke: any user's keys (an operator's view)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(fn=cmd_keys)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "httpcore", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
