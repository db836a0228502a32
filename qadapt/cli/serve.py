"""``qadapt serve``: parse, load the model, run the HTTP server (qadapt/server)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .run import _adapter_options, _model_options, load_from_options


@click.command()
@click.argument("model")
@_model_options
@_adapter_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="QADAPT_API_KEY", metavar="KEY",
              help="Require `Authorization: Bearer KEY` (or `x-api-key`) on every endpoint but /health "
                   "[env QADAPT_API_KEY].")
@click.option("--allow-runtime-adapters", is_flag=True,
              help="Enable /v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/lora_adapters, "
                   "/activate_adapters and LoRAX-style loading on first use.")
@click.option("--adapter-root", default=None, type=click.Path(file_okay=False, exists=True), metavar="DIR",
              help="Folder that local adapters loaded at run time must stay inside.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Sequences decoded together (cache rows).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests waiting for a row; more get 429.")
@click.option("--max-adapters", default=32, show_default=True, type=click.IntRange(min=0),
              help="Resident adapters; past it the least recently used idle one is unloaded (0 = no limit).")
@click.option("--max-rank", default=256, show_default=True, type=click.IntRange(min=0),
              help="Refuse adapters of a higher LoRA rank (0 = no limit).")
@click.option("--max-mixes", default=8, show_default=True, type=click.IntRange(min=0),
              help="Adapter mixes (merged_adapters, weighted adapters, lora scales) kept built; past it the least "
                   "recently used idle one is dropped.")
@click.option("--max-seq-len", default=None, type=click.IntRange(min=2), metavar="N",
              help="Tokens per sequence, prompt and completion (default: the model's context, at most 4096); "
                   "the KV cache holds max-batch x N.")
@click.option("--served-model-name", default=None, metavar="NAME",
              help="The base model's name in requests and /v1/models (default: the file's stem).")
@click.option("--max-body-bytes", default=4 << 20, show_default=True, type=click.IntRange(min=1024),
              help="Largest request body; bigger ones get 413.")
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Open connections past which new ones get 503 at once.")
@click.option("--max-adapter-bytes", default=0, show_default=True, type=click.IntRange(min=0), metavar="BYTES",
              help="Resident adapter memory; past it the least recently used idle adapters are unloaded "
                   "(0 = no limit). Per replica with --replicas.")
@click.option("--replicas", default=0, show_default=True, type=click.IntRange(min=0),
              help="Run N engine replicas on Ray Serve (pip install 'qadapt[ray]'), requests routed by adapter "
                   "affinity; 0 = one process, no Ray.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --replicas: join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a "
                   "local one on loopback.")
@click.option("--replica-cpus", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="With --replicas: CPUs Ray reserves per replica (its torch threads: max(1, this)).")
@click.option("--shutdown-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGINT/SIGTERM, seconds running requests get to finish; waiting ones, and those still "
                   "running after it, end with 503. The process then exits 0.")
def serve(model, host, port, api_key, allow_runtime_adapters, adapter_root, max_batch, max_queue, max_adapters,
          max_rank, max_mixes, max_seq_len, served_model_name, max_body_bytes, max_connections, shutdown_timeout,
          max_adapter_bytes, replicas, ray_address, replica_cpus, **load_opts):
    """Serve MODEL over HTTP: OpenAI-, LoRAX- and TGI-compatible, adapters chosen per request.

    \b
    Endpoints: GET /health, /metrics, /info, /v1/models, /lora-adapters; POST /v1/completions,
    /v1/chat/completions, / (what lorax-client and text-generation call), /generate, /generate_stream;
    with --allow-runtime-adapters also POST /v1/load_lora_adapter, /v1/unload_lora_adapter,
    /activate_adapters and GET /v1/lora_adapters.
    A request's `model` (LoRAX: `adapter_id`) names an adapter, or the base (its file stem or `tgi`: the
    default adapter set, empty unless --activate; `base`: always the bare base); `adapters: [...]`
    names several, `adapters: {name: weight}` and llama.cpp's `lora: [{id, scale}]` weigh them, LoRAX's
    `merged_adapters` mixes them (linear, ties, dare_linear, dare_ties). Structured output:
    `response_format` (both APIs), TGI's `grammar`, vLLM's `guided_json` / `guided_regex` /
    `guided_grammar` / `guided_choice`; OpenAI `tools` go through the chat template.

    \b
    Examples:
      qadapt serve model.Q4_K.gguf --adapter math=./loras/math --adapter code=org/code-lora
      qadapt serve model.Q4_K.gguf --allow-runtime-adapters --adapter-root ./loras --api-key "$KEY"
      curl localhost:8000/v1/completions -d '{"model": "math", "prompt": "2+2=", "max_tokens": 8}'
      curl localhost:8000/generate -d '{"inputs": "2+2=", "parameters": {"adapter_id": "math"}}'
      qadapt serve model.Q4_K.gguf --replicas 4 --adapter math=./loras/math --adapter code=./loras/code

    \b
    With --replicas N: N engines on Ray Serve behind Ray's HTTP proxy, each request sent to a replica
    already holding its adapters (Ray's model multiplexing); GET /fleet reports routing per replica.
    """
    try:
        from qadapt.server.app import create_app
        from qadapt.server.runner import run_server
    except ImportError as e:
        raise click.UsageError(f"the server needs its extra dependencies ({e.name} is missing): "
                               "pip install 'qadapt[serve]'") from None
    if load_opts.get("merge"):
        raise click.UsageError("--merge cannot be served: requests choose their own adapters per row")
    if load_opts.get("xlora") is not None:
        raise click.UsageError("--xlora: serving X-LoRA is not supported yet (the batched engine runs plain LoRA)")
    if replicas:
        return _serve_fleet(model, load_opts, replicas=replicas, ray_address=ray_address, replica_cpus=replica_cpus,
                            host=host, port=port, served_model_name=served_model_name, server_opts=dict(
                                api_key=api_key, allow_runtime=allow_runtime_adapters, adapter_root=adapter_root,
                                max_batch=max_batch, max_adapters=max_adapters, max_rank=max_rank,
                                max_mixes=max_mixes, max_queue=max_queue, max_seq_len=max_seq_len or 4096,
                                max_body_bytes=max_body_bytes, max_adapter_bytes=max_adapter_bytes))
    if ray_address:
        raise click.UsageError("--ray-address needs --replicas N")
    m = load_from_options(model, **load_opts)  # the shared model and adapter options, by name
    given = load_opts.get("activate") is not None or load_opts.get("ordering") is not None
    default = m.active_adapters if given else ()
    name = served_model_name or Path(m.source).stem
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"qadapt: warning: serving on {host} without --api-key: anyone who can reach it can use it",
                   err=True)
    root_level = logging.getLogger().level
    if logging.INFO < root_level <= logging.WARNING:  # per-request log lines unless -q
        logging.getLogger("qadapt.server").setLevel(logging.INFO)
    app = create_app(m, base_name=name, api_key=api_key, allow_runtime=allow_runtime_adapters,
                     adapter_root=adapter_root, max_batch=max_batch, max_adapters=max_adapters, max_rank=max_rank,
                     max_mixes=max_mixes, max_queue=max_queue,
                     max_seq_len=max_seq_len or min(m.config.context_length, 4096),
                     default_adapters=tuple(default), max_body_bytes=max_body_bytes,
                     max_adapter_bytes=max_adapter_bytes)
    click.echo(f"qadapt: serving {name} on http://{host}:{port} (Ctrl+C to stop)", err=True)
    run_server(app, host=host, port=port, log_level="info" if root_level <= logging.INFO else "warning",
               grace=shutdown_timeout, max_connections=max_connections)
    click.echo("qadapt: server stopped", err=True)


def _serve_fleet(model, load_opts, *, replicas, ray_address, replica_cpus, host, port, served_model_name,
                 server_opts):
    """``--replicas N``: the same server as N replicas on Ray Serve (qadapt/server/fleet.py)."""
    try:
        from qadapt.server.fleet import FleetConfig, run_fleet
    except ImportError as e:
        raise click.UsageError(f"--replicas needs Ray Serve ({e.name} is missing): pip install 'qadapt[ray]'") from None
    from qadapt.adapters.sources import resolve_adapter, split_source

    for opt in ("ordering", "adapter_model_id"):
        if load_opts.get(opt) is not None:
            raise click.UsageError(f"--{opt.replace('_', '-')} is not supported with --replicas; give the "
                                   "adapters with --adapter NAME=SOURCE")
    named = dict(split_source(a) for a in load_opts.pop("adapters", ()))
    activate = load_opts.pop("activate", None)
    folders = {n: str(resolve_adapter(src, None)) for n, src in named.items()}  # fetched once, here
    default = tuple(n for n in (activate or "").split(",") if n)
    unknown = [n for n in default if n not in folders]
    if unknown:
        raise click.UsageError(f"--activate names {unknown[0]}, not given with --adapter")
    server_opts["default_adapters"] = ()
    if host not in ("127.0.0.1", "localhost", "::1") and not server_opts["api_key"]:
        click.echo(f"qadapt: warning: serving on {host} without --api-key: anyone who can reach it can use it",
                   err=True)
    cfg = FleetConfig(model=str(Path(model).resolve()) if Path(model).exists() else model, load_opts=load_opts,
                      adapters=folders, server_opts=server_opts, default=default,
                      base_name=served_model_name or Path(model).stem, replicas=replicas, replica_cpus=replica_cpus,
                      threads=max(1, int(replica_cpus)), max_keys=server_opts["max_adapters"] or 1024,
                      max_body_bytes=server_opts["max_body_bytes"], listed=list(folders))
    click.echo(f"qadapt: starting {replicas} replicas of {cfg.base_name} on Ray Serve at http://{host}:{port}",
               err=True)
    run_fleet(cfg, host=host, port=port, ray_address=ray_address, object_store_bytes=128 << 20)
    click.echo("qadapt: fleet stopped", err=True)
