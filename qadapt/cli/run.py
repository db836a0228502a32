"""``qadapt run`` and ``qadapt inspect``: parse, call the API, print."""

from __future__ import annotations

import json
import sys

import click

MODE = click.Choice(["inplace", "dequantize"])


def _adapter_options(f):
    f = click.option("--tgt-non-granular-index", "tgt_non_granular_index", default=None, type=click.IntRange(min=0),
                     metavar="K", help="X-LoRA: freeze each sequence's scalings after K generated tokens "
                                       "(skips the scaling pass from then on).")(f)
    f = click.option("--xlora", default=None, metavar="SRC",
                     help="X-LoRA checkpoint (X-LoRA/mistral.rs or PEFT layout; folder, Hub id or s3:// URL); "
                          "--ordering, if given, must match its training order.")(f)
    f = click.option("--merge", is_flag=True,
                     help="Fold the active adapters into the weights (needs --mode dequantize).")(f)
    f = click.option("--activate", default=None, metavar="A,B",
                     help="Adapters active at start (default: all given with --adapter, and the ordering's "
                          "`order`); '' = base only.")(f)
    f = click.option("--adapter-model-id", default=None, metavar="SRC",
                     help="Folder, Hub id or s3:// URL with one sub-folder per name in the ordering's `order`.")(f)
    f = click.option("--ordering", default=None, type=click.Path(dir_okay=False), metavar="FILE",
                     help="Ordering file (mistral.rs format): adapter names, layers, preloads.")(f)
    f = click.option("--adapter", "adapters", multiple=True, metavar="NAME=SOURCE",
                     help="LoRA adapter (PEFT format): a local folder, a Hub id or s3://bucket/prefix. "
                          "Repeatable.")(f)
    return f


def load_from_options(model, mode, dtype, gguf_file, revision, adapters=(), ordering=None,
                      adapter_model_id=None, activate=None, merge=False, quant=None, xlora=None,
                      tgt_non_granular_index=None, kernels=None, chat_template=None, device=None):
    """The one place the CLI and the server turn their options into ``qadapt.load``."""
    import qadapt
    from qadapt.adapters.sources import split_source

    named = dict(split_source(a) for a in adapters)
    act = None if activate is None else [n for n in activate.split(",") if n]
    return qadapt.load(model, mode=mode, dtype=dtype, gguf_file=gguf_file, revision=revision, adapters=named,
                       ordering=ordering, adapter_model_id=adapter_model_id, activate=act, merge=merge,
                       quant=quant, xlora=xlora, tgt_non_granular_index=tgt_non_granular_index, kernels=kernels,
                       chat_template=chat_template, device=device)


def _model_options(f):
    f = click.option("--device", default=None, metavar="DEV",
                     help="cuda (or cuda:N): run on an NVIDIA GPU (GGUF weights in place through Triton kernels, "
                          "adapters in device slots; pip install 'qadapt[cuda]'). Default: the CPU.")(f)
    f = click.option("--chat-template", default=None, type=click.Path(dir_okay=False, exists=True), metavar="FILE",
                     help="Jinja chat template (.jinja, or a tokenizer_config.json holding `chat_template`) used "
                          "instead of the model's own; needed for chat with a model that has none.")(f)
    f = click.option("--kernels", type=click.Choice(["auto", "exact", "q8", "triton"]), default=None,
                     help="In place: auto (the default, or $QADAPT_KERNELS: llama.cpp's arithmetic where the native "
                          "kernels run it, activations rounded to 8 bits per block of 32, integer dot products; "
                          "logits within ~1-3% of exact), exact (float32 activations, gguf-py's weights: the "
                          "reference numbers, for verification) or q8 (auto, warning where it cannot run).")(f)
    f = click.option("--quant", default=None, metavar="TYPE",
                     help="Quantize a transformers checkpoint on load (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16).")(f)
    f = click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")(f)
    f = click.option("--gguf-file", default=None, metavar="NAME",
                     help="GGUF file inside a Hub repo (MODEL is then org/repo).")(f)
    f = click.option("--dtype", default=None, metavar="DTYPE",
                     help="Compute dtype for dequantize mode: float32 (default), bfloat16, float16.")(f)
    f = click.option("--mode", type=MODE, default="inplace", show_default=True,
                     help="inplace: weights stay quantized in memory; dequantize: expand them on load.")(f)
    return f


@click.command()
@click.argument("model", required=False)
@_model_options
@_adapter_options
@click.option("--demo", is_flag=True,
              help="Run the shipped demo model (see `qadapt demo`) instead of MODEL; --adapter NAME then picks a "
                   "demo adapter: upper, reverse, sum, words.")
@click.option("-p", "--prompt", required=True, help="Text to continue (with --chat: the user's message).")
@click.option("--chat", "as_chat", is_flag=True,
              help="Send the prompt as a user message through the model's chat template (or --chat-template), "
                   "as transformers' apply_chat_template(add_generation_prompt=True) renders it.")
@click.option("--system", default=None, metavar="TEXT", help="With --chat: a system message before the prompt.")
@click.option("-n", "--max-tokens", default=128, show_default=True, type=click.IntRange(min=0),
              help="Maximum new tokens.")
@click.option("-t", "--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy (deterministic).")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {text, token_ids, ...} at the end.")
def run(model, mode, kernels, dtype, gguf_file, revision, quant, chat_template, device, adapters, ordering,
        adapter_model_id, activate, merge, xlora, tgt_non_granular_index, demo, prompt, as_chat, system, max_tokens,
        temperature, top_k, top_p, repetition_penalty, seed, stop, as_json):
    """Generate text from MODEL (a .gguf file, or org/repo with --gguf-file).

    \b
    Examples:
      qadapt run model.Q4_0.gguf -p "Once upon a time" -n 64
      qadapt run model.Q4_K_M.gguf -p "Once upon a time" --kernels exact   # float32, for verification
      qadapt run --demo --adapter upper -p "the cat sees a dog =>"
      qadapt run model.Q8_0.gguf -p "Hello" --mode dequantize --json
      qadapt run TheOrg/Repo-GGUF --gguf-file repo.Q4_K_M.gguf -p "Hi" -t 0.8 --seed 1
      qadapt run model.Q4_0.gguf --adapter upper=./adapters/upper -p "hello"
      qadapt run model.Q4_K_M.gguf --chat --system "Be brief." -p "What is LoRA?"
      qadapt run model.Q8_0.gguf --ordering lora.json --adapter-model-id ./adapters --activate a -p "hi"
      qadapt run model.Q4_K.gguf --xlora ./my-xlora --ordering xlora.json --tgt-non-granular-index 2 -p "hi"
      qadapt run model.Q4_K_M.gguf --device cuda --adapter upper=./adapters/upper -p "hello"
    """
    if demo:
        from qadapt.demo.run import run_options

        model, adapters = run_options(model, adapters)
    elif model is None:
        raise click.UsageError("Missing argument 'MODEL' (or --demo for the shipped demo model).")
    if system is not None and not as_chat:
        raise click.UsageError("--system needs --chat")
    m = load_from_options(model, mode, dtype, gguf_file, revision, adapters, ordering, adapter_model_id,
                          activate, merge, quant=quant, xlora=xlora,
                          tgt_non_granular_index=tgt_non_granular_index, kernels=kernels, chat_template=chat_template,
                          device=device)
    kw = dict(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))
    if as_chat:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        prompt = m.encode_chat(messages + [{"role": "user", "content": prompt}])
    if as_json:
        g = m.generate(prompt, **kw)
        click.echo(json.dumps({"text": g.text, "token_ids": g.token_ids, "prompt_tokens": g.prompt_tokens,
                               "finish_reason": g.finish_reason}))
        return
    for piece in m.generate(prompt, stream=True, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@click.command()
@click.argument("model")
@click.option("--gguf-file", default=None, metavar="NAME", help="GGUF file inside a Hub repo.")
@click.option("--revision", default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model, gguf_file, revision, as_json):
    """Show MODEL's architecture, hyper-parameters, tensor types and adapter-targetable layers.

    Reads metadata only: no weights are loaded.
    """
    from qadapt.inspect import describe

    info = describe(model, gguf_file=gguf_file, revision=revision)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}  ({info['file_size'] / 2**20:.1f} MiB)")
    if "layers" in info:  # a transformers folder: full precision, GPTQ or bitsandbytes
        click.echo(f"architecture: {info['architecture']} ({info['format']})")
        for k, v in (info["quantization"] or {}).items():
            click.echo(f"  {k:<22} {v}")
        click.echo("linears (stored type, bytes of all their tensors):")
        for layer in info["layers"]:
            click.echo(f"  {layer['path']:<46} {layer['qtype']:<10} {layer['bytes']:>12,d}")
        return
    click.echo(f"architecture: {info['architecture']} (GGUF `{info['gguf_architecture']}`)")
    click.echo("hyper-parameters:")
    for k, v in info["config"].items():
        click.echo(f"  {k:<22} {v}")
    click.echo("tensor types:")
    for t in info["tensor_types"]:
        click.echo(f"  {t['type']:<7} {t['count']:>5} tensors  {t['bytes'] / 2**20:10.2f} MiB")
    click.echo("adapter-targetable layers (per block unless noted):")
    for layer in info["targetable"]:
        where = "" if layer["per_block"] else "  (top level)"
        click.echo(f"  {layer['name']:<14} {layer['path']:<46} in={layer['in_features']:<6} "
                   f"out={layer['out_features']:<6} {layer['qtype']}{where}")
